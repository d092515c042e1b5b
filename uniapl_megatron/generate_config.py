"""The `generate` section, its YAML loader, and the checked reading of prompt files (see generate.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from uniapl_megatron.config_fields import Ge, Interval, MinLen, check_fields
from uniapl_megatron.data.schema import LineProblem, decode_line, parse_messages
from uniapl_megatron.rewards.base import PromptRowError

if TYPE_CHECKING:
    from uniapl_megatron.rollout.config import RolloutConfig


class GenerateError(ValueError):
    """A bad generate setting or input line; the message names the field or file:line."""


Positive = Annotated[int, Ge(1)]


@dataclass
class GenerateConfig:
    """The `generate` section (the `teacher` section is a RolloutConfig)."""

    input_paths: Annotated[list[Annotated[str, MinLen(1)]], MinLen(1), "a list of JSONL files"] = field(
        default_factory=list
    )
    """Prompt files (JSONL: "prompt" or "messages"; optional "key", "instruction_id_list", "kwargs")."""
    output_path: Annotated[str, MinLen(1), "a file path"] = ""
    """Where the merged output goes; chunks live in <output_path>.parts/ until the merge."""
    teacher_name: str = ""
    """Name recorded in every row's "teacher" field; "" = the teacher folder's name."""
    tokenizer_path: str | None = None
    """Tokenizer folder (chat template); None = the teacher's model folder."""
    enable_thinking: bool = False
    """Qwen3 chat-template thinking switch for the teacher's prompts."""
    data_parallel_size: Positive = 1
    """Engines (teacher replicas); the world size must be data_parallel_size x teacher.tensor_parallel_size."""
    chunk_size: Positive = 64
    """Prompts per chunk file: the unit of work, of atomic writes and of resuming."""
    temperature: Annotated[float, Ge(0.0)] = 0.7
    """Sampling temperature (Qwen3-Instruct-2507's recommended settings are the defaults)."""
    top_p: Annotated[float, Interval(gt=0.0, le=1.0)] = 0.8
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    top_k: Annotated[int, Ge(0)] = 20
    """Sample among the k most likely tokens; 0 = off."""
    max_new_tokens: Positive = 4096
    """Longest answer, in tokens."""
    seed: int = 0
    """Seeds every sample (with the prompt's global index)."""
    filter_constraints: bool = True
    """Drop answers that fail their own prompt's constraints (rows with instruction_id_list; IFEval and IFBench
    checkers, strict, all constraints)."""
    drop_truncated: bool = True
    """Drop answers cut off at max_new_tokens."""
    decontaminate: bool = True
    """Drop prompts that match an IFEval or IFBench test prompt (rewards.prompts.Decontaminator)."""

    def __post_init__(self) -> None:
        check_fields(self, "generate", GenerateError)

    def sampling_record(self) -> dict[str, Any]:
        """What each output row records of how it was drawn."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "enable_thinking": self.enable_thinking,
        }


@dataclass
class GenerateRun:
    teacher: RolloutConfig
    """The teacher's engine (a `rollout` section, read from `teacher`)."""
    generate: GenerateConfig
    """What to generate, from which prompts, and where it goes."""
    source: str = ""
    """The config file it was read from."""


def load_generate_config(path: str, overrides: list[str]) -> GenerateRun:
    """YAML with sections `teacher` (RolloutConfig) and `generate`; `section.key=value` overrides."""
    import yaml

    from uniapl_megatron.models.arch import ConfigError
    from uniapl_megatron.rollout.config import RolloutConfig
    from uniapl_megatron.trainer.config import _build, _set_path

    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise GenerateError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise GenerateError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise GenerateError(f"{path}: the top level should be a mapping of sections")
    try:
        for o in overrides:
            if "=" not in o:
                raise GenerateError(f"override {o!r}: expected section.key=value")
            k, v = o.split("=", 1)
            _set_path(tree, k.strip(), yaml.safe_load(v))
        unknown = sorted(set(tree) - {"teacher", "generate"})
        if unknown:
            raise GenerateError(f"{path}: unknown section(s) {', '.join(unknown)}; expected: generate, teacher")
        base = Path(path).resolve().parent
        for sec, key in (("teacher", "model_path"), ("generate", "output_path"), ("generate", "tokenizer_path")):
            v = (tree.get(sec) or {}).get(key)
            if isinstance(v, str) and v and not os.path.isabs(v):
                tree[sec][key] = os.path.normpath(base / v)
        gen = tree.get("generate") or {}
        if isinstance(gen.get("input_paths"), list):
            gen["input_paths"] = [
                p if not isinstance(p, str) or os.path.isabs(p) else os.path.normpath(base / p)
                for p in gen["input_paths"]
            ]
        teacher = _build("teacher", RolloutConfig, tree.get("teacher"), path)
        generate = _build("generate", GenerateConfig, gen, path)
    except ConfigError as e:
        raise GenerateError(str(e)) from None
    if teacher.mode != "colocated":
        raise GenerateError("teacher.mode: generate runs its engines in its own ranks; use 'colocated'")
    return GenerateRun(teacher, generate, path)


# --- input ---------------------------------------------------------------------------------------------


def read_prompts(paths: list[str]) -> list[dict[str, Any]]:
    """Every non-blank line of the input files, checked, as {messages, row, where}; in file order."""
    from uniapl_megatron.rewards.ifeval import validate_prompt_row

    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise GenerateError(f"generate.input_paths: {path}: no such file")
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = decode_line(raw.rstrip(b"\n"))
                    messages = parse_messages(obj)
                except LineProblem as e:
                    raise GenerateError(f"{where}: {e.detail}") from None
                if "instruction_id_list" in obj:
                    try:
                        validate_prompt_row(obj, where)
                    except PromptRowError as e:
                        raise GenerateError(str(e)) from None
                key = obj.get("key")
                if key is not None and (not isinstance(key, (int, str)) or isinstance(key, bool)):
                    raise GenerateError(f"{where}: field 'key' must be an integer or a string")
                out.append({"messages": messages, "row": obj, "where": where})
    if not out:
        raise GenerateError(f"generate.input_paths: no prompts in {', '.join(paths)}")
    return out


def fingerprint(run: GenerateRun, prompts: list[dict[str, Any]]) -> dict[str, Any]:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(p["row"], sort_keys=True).encode())
    gen = dataclasses.asdict(run.generate)
    return {
        "prompts": len(prompts),
        "prompts_sha256": h.hexdigest(),
        "teacher_model": run.teacher.model_path,
        **{
            k: gen[k]
            for k in (
                "chunk_size",
                "temperature",
                "top_p",
                "top_k",
                "max_new_tokens",
                "seed",
                "enable_thinking",
                "filter_constraints",
                "drop_truncated",
                "decontaminate",
                "teacher_name",
            )
        },
    }
