"""Training prompts with verifiable constraints, and the decontamination check against IFEval and IFBench.

A prompt is a seed task (``seed_tasks.py``) followed by the descriptions that the upstream
checkers themselves write (``build_description`` with arguments they draw), so every prompt's
constraints are exactly what its ``instruction_id_list``/``kwargs`` verify. Conflicting
instructions are never combined (the checkers' own conflict table, made symmetric).

Decontamination (on lower-cased words, punctuation dropped): a prompt is rejected when it equals
an evaluation prompt (IFEval's 541 or IFBench's 294), or when its own text -- what is left once its
constraint descriptions are masked out, since those are the checkers' templates and shared with IFEval by design --
shares
an 8-word sequence with one, or, where a piece of it has 4 to 7 words, occurs
whole inside one.

    python -m uniapl_megatron.rewards.prompts --num 2000 --out train_prompts.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from lm_eval.tasks.ifeval import instructions_registry  # noqa: E402  (imported after ifeval set nltk up)

from uniapl_megatron.eval.io import write_jsonl
from uniapl_megatron.rewards.base import PromptRowError
from uniapl_megatron.rewards.ifeval import INSTRUCTION_DICT, INSTRUCTION_IDS, InstructionChecker, family_of
from uniapl_megatron.rewards.seed_tasks import SEED_TASKS

_REPEAT = "combination:repeat_prompt"
_MIN_PIECE = 4  # shorter leftover pieces of a prompt are not compared
_WORD = re.compile(r"[a-z0-9]+")


def _conflicts() -> dict[str, set[str]]:
    """The upstream conflict table, closed under symmetry (upstream leaves that to a helper it never calls)."""
    table = {k: set(v) for k, v in copy.deepcopy(instructions_registry.INSTRUCTION_CONFLICTS).items()}
    for key in list(table):
        table[key].add(key)
        for other in list(table[key]):
            table.setdefault(other, {other}).add(key)
    return table


CONFLICTS = _conflicts()


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: the unit of every decontamination comparison."""
    return _WORD.findall(text.lower())


def _ngrams(seq: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}


def _segments(w: list[str], templates: Sequence[list[str]]) -> list[list[str]]:
    """The runs of ``w`` left when every occurrence of a template's word sequence is masked out."""
    masked = [False] * len(w)
    for t in templates:
        k = len(t)
        if not k:
            continue
        for i in range(len(w) - k + 1):
            if w[i : i + k] == t:
                masked[i : i + k] = [True] * k
    out, cur = [], []
    for word, m in zip(w, masked):
        if m:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(word)
    if cur:
        out.append(cur)
    return out


def describe(instruction_ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]], seed: int = 0) -> list[str]:
    """The checkers' descriptions of a row's constraints (what they verify, in their own words)."""
    out = []
    for iid, kw in zip(instruction_ids, kwargs):
        fam = family_of(iid)
        if fam is None:
            raise PromptRowError(f"unknown instruction id {iid!r}")
        checker = fam.registry()[iid](iid)
        state = random.getstate()
        random.seed(seed)
        try:
            out.append(checker.build_description(**fam.drop(kw or {})))
        finally:
            random.setstate(state)
    return out


class Decontaminator:
    """Flags prompts that match evaluation prompts (see the module doc for the rule)."""

    def __init__(self, eval_prompts: Iterable[str], n: int = 8) -> None:
        self.n = n
        self._eval_texts = [" ".join(words(p)) for p in eval_prompts]
        self._eval_exact = set(self._eval_texts)
        self._eval_ngrams: set[tuple[str, ...]] = set()
        for text in self._eval_texts:
            self._eval_ngrams |= _ngrams(text.split(), n)
        if not self._eval_texts:
            raise ValueError("decontamination needs at least one evaluation prompt")

    def reason(self, prompt: str, template_texts: Sequence[str] = ()) -> str | None:
        """Why ``prompt`` is contaminated, or None when it is clean."""
        w = words(prompt)
        if " ".join(w) in self._eval_exact:
            return "identical to an evaluation prompt"
        for segment in _segments(w, [words(t) for t in template_texts]):
            if len(segment) < _MIN_PIECE:
                continue  # a stray word or three between constraint texts says nothing
            if len(segment) < self.n:
                padded = f" {' '.join(segment)} "
                if any(padded in f" {t} " for t in self._eval_texts):
                    return f"the words '{padded.strip()}' occur in an evaluation prompt"
            else:
                hits = _ngrams(segment, self.n) & self._eval_ngrams
                if hits:
                    return "shares the words '" + " ".join(sorted(hits)[0]) + "' with an evaluation prompt"
        return None

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
        """(row index, reason) for every contaminated row; descriptions come from its kwargs."""
        bad = []
        for i, row in enumerate(rows):
            templates = describe(row["instruction_id_list"], row["kwargs"]) if row.get("instruction_id_list") else []
            why = self.reason(row["prompt"], templates)
            if why:
                bad.append((i, why))
        return bad


def eval_prompts() -> list[str]:
    """Every evaluation prompt training data must stay clear of: IFEval's 541 and IFBench's 294."""
    from uniapl_megatron.eval.ifeval_data import load_ifeval_prompts
    from uniapl_megatron.rewards.ifbench import load_ifbench_prompts

    return [r["prompt"] for r in load_ifeval_prompts()] + [r["prompt"] for r in load_ifbench_prompts()]


def eval_decontaminator() -> Decontaminator:
    """Decontaminator against both test sets (IFEval and IFBench)."""
    return Decontaminator(eval_prompts())


ifeval_decontaminator = eval_decontaminator  # the name older callers use


@dataclass
class PromptGenConfig:
    # Number of prompt rows to produce.
    num_prompts: int = 1000
    # Fewest constraints per prompt.
    min_instructions: int = 1
    # Most constraints per prompt (IFEval prompts carry 1 to 3).
    max_instructions: int = 3
    # Seeds every draw (seed task, instruction types, the checkers' arguments): same seed, same rows.
    seed: int = 0
    # Instruction ids never used (e.g. ["language:response_language"] for an English-only student).
    exclude: list[str] = field(default_factory=list)
    # Seed tasks to draw from; empty = the package's SEED_TASKS.
    seed_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not 1 <= self.min_instructions <= self.max_instructions:
            raise ValueError(
                f"need 1 <= min_instructions <= max_instructions, got {self.min_instructions}, {self.max_instructions}"
            )
        unknown = sorted(set(self.exclude) - set(INSTRUCTION_IDS))
        if unknown:
            raise ValueError(f"exclude: unknown instruction id(s) {unknown}; known: {', '.join(INSTRUCTION_IDS)}")


def _draw_args(iid: str, rng: random.Random, prompt_to_repeat: str | None) -> tuple[dict[str, Any], str]:
    """Let the checker draw its own arguments (seeded from ``rng``); returns (kwargs, description)."""
    for _ in range(20):
        checker = INSTRUCTION_DICT[iid](iid)
        state = random.getstate()
        random.seed(rng.randrange(2**31))
        try:
            if iid == _REPEAT:
                desc = checker.build_description(prompt_to_repeat=prompt_to_repeat)
            else:
                desc = checker.build_description()
            args = dict(checker.get_instruction_args() or {})
        finally:
            random.setstate(state)
        # Upstream may draw nth_paragraph = num_paragraphs + 1, which no response can satisfy.
        if iid == "length_constraints:nth_paragraph_first_word" and args["nth_paragraph"] > args["num_paragraphs"]:
            continue
        return args, desc
    raise RuntimeError(f"{iid}: could not draw satisfiable arguments")


def _pick_instructions(rng: random.Random, k: int, pool: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for _ in range(k):
        options = [i for i in pool if all(i not in CONFLICTS.get(c, {c}) for c in chosen)]
        if not options:
            break
        chosen.append(rng.choice(options))
    return chosen


def make_row(task: str, instruction_ids: Sequence[str], rng: random.Random) -> dict[str, Any]:
    """One prompt row: the task, then each constraint's description (a repeat-the-prompt one last)."""
    ids = [i for i in instruction_ids if i != _REPEAT] + [i for i in instruction_ids if i == _REPEAT]
    parts, kwargs = [task], []
    for iid in ids:
        args, desc = _draw_args(iid, rng, prompt_to_repeat=" ".join(parts) if iid == _REPEAT else None)
        kwargs.append(args)
        parts.append(desc)
    prompt = " ".join(parts[:-1]) + ("\n" if ids[-1] == _REPEAT else " ") + parts[-1]
    return {"prompt": prompt, "instruction_id_list": list(ids), "kwargs": kwargs}


def generate_training_prompts(
    config: PromptGenConfig, decontaminator: Decontaminator | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows ``{key, prompt, instruction_id_list, kwargs, seed_task}`` and counts of what was rejected.

    Every row is decontaminated (against the 541 IFEval and 294 IFBench test prompts unless a
    decontaminator is given) and validated by building its checkers.
    """
    rng = random.Random(config.seed)
    deco = decontaminator or eval_decontaminator()
    tasks = list(config.seed_tasks) or list(SEED_TASKS)
    clean_tasks = [t for t in tasks if deco.reason(t) is None]
    stats = {
        "seed_tasks": len(tasks),
        "seed_tasks_contaminated": len(tasks) - len(clean_tasks),
        "rows_contaminated": 0,
        "duplicates": 0,
    }
    if not clean_tasks:
        raise ValueError("every seed task matches an evaluation prompt; nothing to generate from")
    pool = [i for i in INSTRUCTION_IDS if i not in set(config.exclude)]
    checker = InstructionChecker()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < config.num_prompts:
        attempts += 1
        if attempts > 20 * config.num_prompts + 1000:
            raise RuntimeError(f"only {len(rows)} distinct clean prompts after {attempts} attempts; add seed tasks")
        task = rng.choice(clean_tasks)
        ids = _pick_instructions(rng, rng.randint(config.min_instructions, config.max_instructions), pool)
        row = make_row(task, ids, rng)
        if row["prompt"] in seen:
            stats["duplicates"] += 1
            continue
        if deco.reason(row["prompt"], describe(row["instruction_id_list"], row["kwargs"])):
            stats["rows_contaminated"] += 1
            continue
        checker.check(row, "x", where=f"generated row {len(rows)}")  # builds (validates) the checkers
        seen.add(row["prompt"])
        row = {"key": f"train-{len(rows):06d}", **row, "seed_task": task}
        rows.append(row)
    return rows, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate decontaminated training prompts with verifiable constraints.")
    ap.add_argument("--num", type=int, default=1000, help="number of prompts")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-instructions", type=int, default=1)
    ap.add_argument("--max-instructions", type=int, default=3)
    ap.add_argument("--exclude", nargs="*", default=[], help="instruction ids to leave out")
    args = ap.parse_args(argv)
    try:
        cfg = PromptGenConfig(
            num_prompts=args.num,
            seed=args.seed,
            exclude=args.exclude,
            min_instructions=args.min_instructions,
            max_instructions=args.max_instructions,
        )
        rows, stats = generate_training_prompts(cfg)
        write_jsonl(rows, args.out)
    except (ValueError, RuntimeError, OSError, PromptRowError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "rows": len(rows), **stats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
