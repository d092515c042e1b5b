"""POLAR (InternLM, arXiv 2507.05197): a reference-conditioned reward model, loaded without remote code.

Facts taken from InternLM/POLAR's README and client (``src/polar/reward_func.py``) and from the
``InternLM2ForRewardModel`` modeling file its HF folders ship:

- Input: one string, ``P + "\\n" + R + "<|reward|>" + P + "\\n" + C + "[UNUSED_TOKEN_130]"`` for
  the "sft" wrapper (``P + R`` without the newline for "pretrain"), where P, R, C are the prompt,
  reference and candidate (chat messages joined by "\\n"). Before that, each field is tokenized
  with special tokens, R and C are cut to ``max_response_length`` tokens (from the right by
  default), P is cut from the left to ``(max_length - 4 - |R| - |C|) // 2`` tokens, and each is
  decoded back with special tokens skipped.
- The string is tokenized with special tokens (InternLM2 puts ``<s>`` first); the last token must
  be the reward token (``config.reward_token_id``, 92527 = ``[UNUSED_TOKEN_130]``).
- Model: InternLM2 decoder (``model.*``: ``tok_embeddings``, per layer ``attention.wqkv`` /
  ``attention.wo`` / ``attention_norm`` / ``feed_forward.w1,w2,w3`` / ``ffn_norm``, final ``norm``)
  and ``v_head`` = Linear(hidden, 1, no bias). The score is ``v_head`` at the last real token: an
  unbounded real number, higher = closer to the reference (the README's example: -0.57 for the
  reference itself, -11.03 for a wrong answer, with POLAR-7B).

Here the decoder is transformers' Llama (the same computation: RMSNorm, RoPE with rotate-half,
grouped-query attention, SiLU-gated MLP), filled from InternLM2's names by the table below; the
fused ``wqkv`` is split by InternLM2's grouped layout. Weights come from safetensors only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from safetensors import safe_open

from uniapl_megatron.discriminator.base import (
    DiscriminatorBase,
    DiscriminatorError,
    check_triples,
    register_discriminator,
)
from uniapl_megatron.discriminator.config import DiscriminatorConfig

log = logging.getLogger(__name__)

ARCHITECTURE = "InternLM2ForRewardModel"
REWARD_SEPARATOR = "<|reward|>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
# POLAR's client keeps 4 tokens of max_length for the reward token, <|reward|> and two newlines.
_RESERVED = 4
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "reward_token_id",
)


def polar_text(prompt: str, reference: str, candidate: str, wrapper: Literal["sft", "pretrain"] = "sft") -> str:
    """POLAR's input string from already-truncated fields."""
    sep = "" if wrapper == "pretrain" else "\n"
    return f"{prompt}{sep}{reference}{REWARD_SEPARATOR}{prompt}{sep}{candidate}{REWARD_TOKEN}"


def as_text(field: str | Sequence[dict]) -> str:
    """A field as POLAR reads it: a string, or chat messages whose contents are joined by newlines."""
    if isinstance(field, str):
        return field
    return "\n".join(m["content"] for m in field)


class PolarEncoder:
    """Fields -> POLAR's string -> token ids, with POLAR's truncation rules."""

    def __init__(
        self,
        tokenizer: Any,
        reward_token_id: int,
        max_length: int = 16384,
        max_response_length: int = 4096,
        cut_side: Literal["right", "left"] = "right",
        wrapper: Literal["sft", "pretrain"] = "sft",
        max_reference_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.reward_token_id = reward_token_id
        self.max_length = max_length - _RESERVED
        self.max_response_length = max_response_length
        # POLAR uses one budget for both; a separate one for the reference is ours (None = the same)
        self.max_reference_length = max_reference_length or max_response_length
        self.cut_side = cut_side
        self.wrapper = wrapper
        self.truncated_fields = 0  # fields cut so far

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _cut_response(self, ids: list[int], budget: int) -> list[int]:
        if len(ids) <= budget:
            return ids
        self.truncated_fields += 1
        return ids[:budget] if self.cut_side == "right" else ids[-budget:]

    def text(self, prompt: str, reference: str, candidate: str) -> str:
        """POLAR's input string for one triple (fields cut to their budgets first)."""
        r1 = self._cut_response(self._ids(reference), self.max_reference_length)
        r2 = self._cut_response(self._ids(candidate), self.max_response_length)
        p = self._ids(prompt)
        budget = (self.max_length - len(r1) - len(r2)) // 2
        if len(p) > budget:
            self.truncated_fields += 1
            p = p[-budget:] if budget > 0 else []
        dec = self.tokenizer.decode
        return polar_text(
            dec(p, skip_special_tokens=True),
            dec(r1, skip_special_tokens=True),
            dec(r2, skip_special_tokens=True),
            self.wrapper,
        )

    def encode(self, prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> list[list[int]]:
        check_triples(prompts, references, candidates)
        out = []
        for i, (p, r, c) in enumerate(zip(prompts, references, candidates)):
            ids = self._ids(self.text(p, r, c))
            if not ids or ids[-1] != self.reward_token_id:
                raise DiscriminatorError(
                    f"score: input {i} does not end with the reward token {self.reward_token_id} "
                    f"({REWARD_TOKEN!r}) after tokenization (last id {ids[-1] if ids else None}); the tokenizer "
                    "must know it as one special token and must not append anything after it"
                )
            out.append(ids)
        return out


# --- weights: InternLM2 names -> the Llama modules we build ----------------------------------------------------


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused wqkv rows are [kv_head][q_1..q_groups, k, v][head_dim]; return (q, k, v)."""
    groups = heads // kv_heads
    rest = w.shape[1:]
    g = w.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = g[:, :groups].reshape(heads * head_dim, *rest)
    k = g[:, groups].reshape(kv_heads * head_dim, *rest)
    v = g[:, groups + 1].reshape(kv_heads * head_dim, *rest)
    return q, k, v


# (InternLM2 name under model.layers.{i}., our names under model.layers.{i}., transform or None)
LAYER_TABLE: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    (
        "attention.wqkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "split_wqkv",
    ),
    ("attention.wqkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "split_wqkv"),
    ("attention.wo.weight", ("self_attn.o_proj.weight",), None),
    ("attention.wo.bias", ("self_attn.o_proj.bias",), None),
    ("attention_norm.weight", ("input_layernorm.weight",), None),
    ("ffn_norm.weight", ("post_attention_layernorm.weight",), None),
    ("feed_forward.w1.weight", ("mlp.gate_proj.weight",), None),
    ("feed_forward.w3.weight", ("mlp.up_proj.weight",), None),
    ("feed_forward.w2.weight", ("mlp.down_proj.weight",), None),
)
# (InternLM2 name, our name) outside the layers
GLOBAL_TABLE: tuple[tuple[str, str], ...] = (
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("v_head.weight", "v_head.weight"),
)
# Present in some InternLM2 folders but unused by a reward model.
_IGNORED = ("output.weight",)


def map_weights(
    tensors: Callable[[str], torch.Tensor | None], names: set[str], cfg: dict, where: str
) -> dict[str, torch.Tensor]:
    """Our state dict from InternLM2's tensors (``tensors(name)``); refuses missing and unknown names."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = hidden // heads
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for theirs, ours in GLOBAL_TABLE:
        if theirs not in names:
            raise DiscriminatorError(f"{where}: tensor {theirs!r} missing (an {ARCHITECTURE} checkpoint has it)")
        out[ours] = tensors(theirs)
        used.add(theirs)
    for i in range(cfg["num_hidden_layers"]):
        for theirs, ours, transform in LAYER_TABLE:
            name = f"model.layers.{i}.{theirs}"
            if name not in names:
                if theirs.endswith(".bias") and not cfg.get("bias", False):
                    continue
                raise DiscriminatorError(f"{where}: tensor {name!r} missing")
            t = tensors(name)
            parts = split_wqkv(t, heads, kv_heads, head_dim) if transform == "split_wqkv" else (t,)
            for our, part in zip(ours, parts):
                out[f"model.layers.{i}.{our}"] = part.contiguous()
            used.add(name)
    unknown = sorted(names - used - set(_IGNORED))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DiscriminatorError(f"{where}: {len(unknown)} tensor(s) this {ARCHITECTURE} layout does not use: {shown}")
    return out


def read_config(path: Path) -> dict:
    """The folder's config.json, checked to be an InternLM2 reward model we can build."""
    file = path / "config.json"
    if not file.is_file():
        raise DiscriminatorError(f"discriminator.path: {file} is missing (expected a POLAR checkpoint folder)")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiscriminatorError(f"{file}: not valid JSON ({exc})") from exc
    archs = cfg.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise DiscriminatorError(f"{file}: architectures={archs}; kind 'polar' needs {ARCHITECTURE!r}")
    for key in _REQUIRED_KEYS:
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise DiscriminatorError(f"{file}: {key!r} must be an integer, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise DiscriminatorError(f"{file}: hidden_act={cfg['hidden_act']!r}; InternLM2 uses 'silu'")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["hidden_size"] % heads or heads % kv:
        raise DiscriminatorError(
            f"{file}: hidden_size {cfg['hidden_size']}, {heads} heads and {kv} KV heads do not divide evenly"
        )
    scaling = cfg.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, dict) or scaling.get("type") not in ("dynamic", "linear")):
        raise DiscriminatorError(f"{file}: rope_scaling={scaling!r}; supported are null, 'dynamic' and 'linear'")
    return cfg


def llama_config(cfg: dict) -> Any:
    """The transformers LlamaConfig that computes what InternLM2's config describes.

    Dynamic NTK scaling only acts beyond max_position_embeddings, which the loader refuses, so it
    maps to plain RoPE; linear scaling maps to Llama's linear rope type.
    """
    from transformers import LlamaConfig

    scaling = cfg.get("rope_scaling")
    linear = scaling is not None and scaling["type"] == "linear"
    rope = {"rope_type": "linear", "factor": float(scaling["factor"])} if linear else None
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=rope,
        attention_bias=bool(cfg.get("bias", False)),
        mlp_bias=False,
        tie_word_embeddings=False,
        hidden_act="silu",
        pad_token_id=cfg.get("pad_token_id"),
    )


class InternLM2RewardModel(torch.nn.Module):
    """Llama decoder (InternLM2's computation) + ``v_head``; ``forward`` returns one score per row."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import LlamaModel

        config._attn_implementation = "sdpa"
        self.model = LlamaModel(config)
        self.v_head = torch.nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded ``input_ids`` [B, T]; ``lengths`` [B]; returns [B] float32 scores."""
        width = input_ids.shape[1]
        mask = torch.arange(width, device=input_ids.device)[None, :] < lengths[:, None]
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        last = hidden[torch.arange(len(lengths), device=input_ids.device), lengths - 1]
        return self.v_head(last).squeeze(-1).float()


def _tensor_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise DiscriminatorError(f"discriminator.path: no *.safetensors weights in {path}{hint}")
    return files


def load_reward_model(path: Path, cfg: dict, dtype: torch.dtype) -> InternLM2RewardModel:
    """Build the model from config.json and fill it from the folder's safetensors through the tables."""
    files = _tensor_files(path)
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                where[name] = f

    def tensor(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as sf:
            return sf.get_tensor(name)

    state = map_weights(tensor, set(where), cfg, str(path))
    with torch.device("meta"):
        model = InternLM2RewardModel(llama_config(cfg))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise DiscriminatorError(f"{path}: no tensor maps to {name!r}")
        if tuple(state[name].shape) != tuple(shape):
            raise DiscriminatorError(
                f"{path}: {name!r} has shape {list(state[name].shape)}, the config says {list(shape)}"
            )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    # RoPE's inverse frequencies are a buffer computed at construction: build it for real, in float32
    # (as transformers does; a bf16 copy would lose precision at long positions).
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(model.model.config)
    return model.eval().requires_grad_(False)


def load_polar_tokenizer(cfg: DiscriminatorConfig, reward_token_id: int) -> Any:
    """The tokenizer of ``cfg.tokenizer_path`` or the checkpoint folder, checked to know the reward token."""
    from transformers import AutoTokenizer

    folder = cfg.tokenizer_path or cfg.path
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise DiscriminatorError(
            f"discriminator: could not load a tokenizer from {folder}: {exc}. POLAR folders ship InternLM2's "
            "tokenizer as Python code (tokenization_internlm2.py); either give discriminator.tokenizer_path a "
            "folder with a tokenizer.json of the same vocabulary, or set discriminator.trust_remote_code: true "
            "(runs that file for the tokenizer only; the weights still load natively)"
        ) from exc
    got = tok.convert_tokens_to_ids(REWARD_TOKEN)
    if got != reward_token_id:
        raise DiscriminatorError(
            f"discriminator: the tokenizer in {folder} maps {REWARD_TOKEN!r} to {got}, but config.json's "
            f"reward_token_id is {reward_token_id}; they must agree"
        )
    return tok


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Row indices grouped longest first so that rows x padded width stays within ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        # the batch's width is its first (longest) row's length
        if cur and len(cur) < max_rows and (len(cur) + 1) * lengths[cur[0]] <= max_tokens:
            cur.append(i)
        else:
            batches.append([i])
    return batches


@register_discriminator("polar")
class PolarDiscriminator(DiscriminatorBase):
    """The Discriminator protocol for a POLAR checkpoint (frozen, never trained here)."""

    def __init__(
        self, model: InternLM2RewardModel, encoder: PolarEncoder, cfg: DiscriminatorConfig, device: torch.device
    ):
        self.model = model
        self.encoder = encoder
        self.cfg = cfg
        self.device = device
        self.pad_id = 0

    @classmethod
    def from_config(cls, cfg: DiscriminatorConfig) -> "PolarDiscriminator":
        from uniapl_megatron.discriminator.hf_scorer import resolve_device

        if cfg.kind != "polar":
            raise DiscriminatorError(f"discriminator.kind: PolarDiscriminator needs 'polar', got {cfg.kind!r}")
        path = Path(cfg.path)
        if not path.is_dir():
            raise DiscriminatorError(f"discriminator.path: {str(path)!r} is not a folder")
        mcfg = read_config(path)
        limit = mcfg.get("max_position_embeddings", 32768)
        if cfg.max_length > limit:
            raise DiscriminatorError(
                f"discriminator.max_length: {cfg.max_length} exceeds the model's max_position_embeddings {limit}"
            )
        device = resolve_device(cfg.device)
        model = load_reward_model(path, mcfg, _DTYPES[cfg.dtype]).to(device)
        tok = load_polar_tokenizer(cfg, mcfg["reward_token_id"])
        encoder = PolarEncoder(
            tok,
            mcfg["reward_token_id"],
            cfg.max_length,
            cfg.max_candidate_tokens,
            cfg.response_cut_side,
            cfg.polar_wrapper,
            cfg.max_reference_tokens,
        )
        return cls(model, encoder, cfg, device)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> list[float]:
        """POLAR's reward for each (prompt, reference, candidate), in input order."""
        ids = self.encoder.encode(prompts, references, candidates)
        out = [0.0] * len(ids)
        lengths = [len(r) for r in ids]
        for batch in token_budget_batches(lengths, self.cfg.max_tokens_per_batch, self.cfg.batch_size):
            width = lengths[batch[0]]
            x = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            for j, i in enumerate(batch):
                x[j, : lengths[i]] = torch.tensor(ids[i], dtype=torch.long)
            lens = torch.tensor([lengths[i] for i in batch], device=self.device)
            scores = self.model(x.to(self.device), lens).cpu().tolist()
            for i, s in zip(batch, scores):
                out[i] = float(s)
        return out
