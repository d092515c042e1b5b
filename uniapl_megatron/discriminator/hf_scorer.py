"""A Hugging Face transformer with a scalar head, read at each input's last token.

Shared by the frozen and the online discriminator. Inputs are right-padded, so with causal
attention a sequence's hidden states never see the padding and its score does not depend on
what else is in the batch. Weights load from safetensors only (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from uniapl_megatron.discriminator.base import DiscriminatorError, check_triples
from uniapl_megatron.discriminator.config import DiscriminatorConfig

VALUE_HEAD_FILE = "value_head.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiscriminatorError(f"discriminator.device: {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def _check_folder(path: Path) -> dict:
    """The folder's config.json, after checking that it holds safetensors weights."""
    if not path.is_dir():
        raise DiscriminatorError(f"discriminator.path: {str(path)!r} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DiscriminatorError(f"discriminator.path: {config_file} is missing (expected a Hugging Face checkpoint)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiscriminatorError(f"{config_file}: not valid JSON ({exc})") from exc
    weights = [p for p in path.glob("*.safetensors") if p.name != VALUE_HEAD_FILE]
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise DiscriminatorError(f"discriminator.path: no *.safetensors model weights in {path}{hint}")
    return config


def _load_value_head(file: Path, hidden: int, dtype: torch.dtype) -> torch.nn.Linear:
    tensors = load_file(str(file))
    weight = tensors.get("weight")
    if weight is None or tuple(weight.shape) != (1, hidden):
        got = None if weight is None else list(weight.shape)
        raise DiscriminatorError(f"{file}: expected a tensor 'weight' of shape [1, {hidden}], got {got}")
    bias = tensors.get("bias")
    if bias is not None and tuple(bias.shape) != (1,):
        raise DiscriminatorError(f"{file}: tensor 'bias' must have shape [1], got {list(bias.shape)}")
    head = torch.nn.Linear(hidden, 1, bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


class HFScorer(torch.nn.Module):
    """backbone (HF base model) + head (Linear H -> 1), plus the tokenizer and input template."""

    def __init__(
        self, backbone: torch.nn.Module, head: torch.nn.Linear, tokenizer, template: str, cfg: DiscriminatorConfig
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.template = template
        self.cfg = cfg
        self.truncated_fields = 0  # how many fields were cut to their token budget so far
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    @classmethod
    def from_pretrained(cls, cfg: DiscriminatorConfig, template: str, *, new_head_ok: bool) -> "HFScorer":
        """Load from ``cfg.path``; ``new_head_ok`` lets a plain LM start with a zero head (online kind)."""
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        path = Path(cfg.path)
        config = _check_folder(path)
        dtype = _DTYPES[cfg.dtype]
        common = dict(dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
        archs = config.get("architectures") or []
        if "InternLM2ForRewardModel" in archs:
            raise DiscriminatorError(
                f"discriminator.path: {path} is a POLAR / InternLM2 reward model; set discriminator.kind: polar"
            )
        try:
            if any(a.endswith("ForSequenceClassification") for a in archs):
                model = AutoModelForSequenceClassification.from_pretrained(str(path), **common)
                if model.config.num_labels != 1:
                    raise DiscriminatorError(
                        f"discriminator.path: {path} has num_labels={model.config.num_labels}; a scalar "
                        "reward model needs num_labels=1"
                    )
                head = getattr(model, "score", None)
                if not isinstance(head, torch.nn.Linear):
                    raise DiscriminatorError(
                        f"discriminator.path: {archs[0]} has no Linear `score` head (decoder-style reward models only)"
                    )
                backbone = model.base_model
            else:
                head_file = path / VALUE_HEAD_FILE
                if not head_file.is_file() and not new_head_ok:
                    raise DiscriminatorError(
                        f"discriminator.path: {path} is neither a *ForSequenceClassification checkpoint "
                        f"(architectures={archs}) nor a model with {VALUE_HEAD_FILE}"
                    )
                backbone = AutoModel.from_pretrained(str(path), **common)
                hidden = backbone.config.hidden_size
                if head_file.is_file():
                    head = _load_value_head(head_file, hidden, dtype)
                else:
                    head = torch.nn.Linear(hidden, 1, dtype=dtype)
                    torch.nn.init.zeros_(head.weight)
                    torch.nn.init.zeros_(head.bias)
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path or str(path))
        except DiscriminatorError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise DiscriminatorError(f"discriminator.path: could not load {path}: {exc}") from exc
        scorer = cls(backbone, head, tokenizer, template, cfg)
        return scorer.to(resolve_device(cfg.device))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _cut(self, texts: Sequence[str], budget: int) -> list[str]:
        out = list(texts)
        ids = self.tokenizer(out, add_special_tokens=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > budget:
                out[i] = self.tokenizer.decode(row[:budget])
                self.truncated_fields += 1
        return out

    def encode(self, prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]) -> list[list[int]]:
        """Token ids of each filled template (fields cut to their budgets first)."""
        check_triples(prompts, references, candidates)
        if not candidates:
            return []
        p = self._cut(prompts, self.cfg.max_prompt_tokens)
        c = self._cut(candidates, self.cfg.max_candidate_tokens)
        r = self._cut(references, self.cfg.max_reference_tokens) if "{reference}" in self.template else references
        texts = [self.template.format(prompt=a, reference=b, candidate=d) for a, b, d in zip(p, r, c)]
        return [list(row) for row in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def logits(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N] head outputs of encoded inputs, one forward per batch (gradients as the caller's mode)."""
        out = []
        for start in range(0, len(ids), self.cfg.batch_size):
            out.append(self._forward(ids[start : start + self.cfg.batch_size]))
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def _forward(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        if int(lengths.min()) == 0:
            raise DiscriminatorError("score: an input encoded to zero tokens")
        width = int(lengths.max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()
