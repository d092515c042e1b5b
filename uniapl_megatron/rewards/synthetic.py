"""A tiny synthetic instruction-following task family for the CPU demo.

Short prompts ("Describe the sun." plus one or two constraints, each in the IFEval checker's own
words) and a programmatic teacher answer that satisfies them, e.g.::

    Describe the sun. Wrap your entire response with double quotation marks. ...
    -> "i think the sun is hot, bright and big."

Answers have at most 12 words over a vocabulary of about 70 words, so a very small randomly
initialised model can learn the family from SFT + RL in minutes. The constraints are IFEval
instruction ids, so the ``ifeval`` reward scores these rows like any other; every teacher answer
scores 1.0 (the tests check all of them).

Rows: ``{"key", "prompt", "instruction_id_list", "kwargs", "teacher_response"}``. Every
(topic, phrasing, constraint set) combination is assigned to "train" or "eval" by a fixed hash,
so the two splits share no prompt.

    python -m uniapl_megatron.rewards.synthetic --num 2000 --split train --out synth_train.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
from dataclasses import dataclass
from typing import Any

from uniapl_megatron.eval.io import write_jsonl
from uniapl_megatron.rewards.prompts import describe

# topic -> three adjectives; "I think the <topic> is <a>, <b> and <c>." (langdetect reads every
# variant, lower- or upper-case, as English, which the case checkers require)
TOPICS: dict[str, tuple[str, str, str]] = {
    "cat": ("small", "soft", "calm"),
    "dog": ("loyal", "happy", "kind"),
    "sun": ("hot", "bright", "big"),
    "moon": ("pale", "round", "far"),
    "tree": ("tall", "green", "old"),
    "river": ("long", "cold", "wide"),
    "bird": ("small", "quick", "free"),
    "city": ("big", "busy", "loud"),
    "book": ("old", "good", "long"),
    "apple": ("red", "sweet", "fresh"),
    "car": ("fast", "new", "loud"),
    "house": ("warm", "quiet", "safe"),
    "sea": ("deep", "blue", "wide"),
    "rain": ("wet", "cold", "soft"),
    "snow": ("white", "cold", "soft"),
    "garden": ("green", "quiet", "pretty"),
}
PHRASINGS = ("Describe the {topic}.", "Tell me about the {topic}.", "Write a sentence about the {topic}.")
KEYWORDS = ("very", "really", "always", "truly")
END_PHRASES = ("The end.", "Thank you.", "Goodbye.")

# constraint name -> IFEval instruction id
CONSTRAINTS: dict[str, str] = {
    "lowercase": "change_case:english_lowercase",
    "uppercase": "change_case:english_capital",
    "quote": "startend:quotation",
    "end": "startend:end_checker",
    "keyword": "keywords:existence",
    "no_comma": "punctuation:no_comma",
}
# pairs no answer can satisfy together (quotes would follow the end phrase)
_INCOMPATIBLE = {frozenset({"lowercase", "uppercase"}), frozenset({"quote", "end"})}
# order in which constraints reshape the answer: content first, then wrapping, then case
_APPLY_ORDER = ("keyword", "no_comma", "end", "quote", "lowercase", "uppercase")


def constraint_sets() -> list[tuple[str, ...]]:
    """Every set of one or two compatible constraints, in a fixed order."""
    names = list(CONSTRAINTS)
    singles = [(n,) for n in names]
    pairs = [p for p in itertools.combinations(names, 2) if frozenset(p) not in _INCOMPATIBLE]
    return singles + pairs


def teacher_answer(topic: str, constraints: tuple[str, ...], keyword: str, end_phrase: str) -> str:
    """The answer that satisfies ``constraints``; at most 12 words."""
    a, b, c = TOPICS[topic]
    kw = f"{keyword} " if "keyword" in constraints else ""
    sep = " and " if "no_comma" in constraints else ", "
    text = f"I think the {topic} is {kw}{a}{sep}{b} and {c}."
    for name in _APPLY_ORDER:
        if name not in constraints:
            continue
        if name == "end":
            text = f"{text} {end_phrase}"
        elif name == "quote":
            text = f'"{text}"'
        elif name == "lowercase":
            text = text.lower()
        elif name == "uppercase":
            text = text.upper()
    return text


def _split_of(topic: str, phrasing: int, cset: tuple[str, ...], eval_fraction: float) -> str:
    h = hashlib.sha256(f"{topic}|{phrasing}|{'+'.join(cset)}".encode()).digest()
    return "eval" if int.from_bytes(h[:8], "big") / 2**64 < eval_fraction else "train"


def make_row(topic: str, phrasing: int, cset: tuple[str, ...], rng: random.Random) -> dict[str, Any]:
    keyword, end_phrase = rng.choice(KEYWORDS), rng.choice(END_PHRASES)
    ids, kwargs = [], []
    for name in cset:
        ids.append(CONSTRAINTS[name])
        kwargs.append(
            {"keywords": [keyword]} if name == "keyword" else {"end_phrase": end_phrase} if name == "end" else {}
        )
    prompt = " ".join([PHRASINGS[phrasing].format(topic=topic), *describe(ids, kwargs)])
    return {
        "prompt": prompt,
        "instruction_id_list": ids,
        "kwargs": kwargs,
        "teacher_response": teacher_answer(topic, cset, keyword, end_phrase),
    }


@dataclass
class SyntheticConfig:
    # Number of rows to produce (combinations repeat, with fresh keyword/end-phrase draws, once all are used).
    num_rows: int = 1000
    # "train" or "eval": which side of the fixed hash split of (topic, phrasing, constraint set).
    split: str = "train"
    # Share of combinations that belong to "eval".
    eval_fraction: float = 0.1
    # Seeds the order of the rows and the keyword / end-phrase draws.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {self.split!r}")
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


def split_combinations(split: str, eval_fraction: float = 0.1) -> list[tuple[str, int, tuple[str, ...]]]:
    """The (topic, phrasing, constraint set) combinations of one side of the split, in a fixed order."""
    return [
        (t, p, c)
        for t in TOPICS
        for p in range(len(PHRASINGS))
        for c in constraint_sets()
        if _split_of(t, p, c, eval_fraction) == split
    ]


def generate_synthetic(config: SyntheticConfig) -> list[dict[str, Any]]:
    rng = random.Random(config.seed)
    combos = split_combinations(config.split, config.eval_fraction)
    rows: list[dict[str, Any]] = []
    while len(rows) < config.num_rows:
        order = combos[:]
        rng.shuffle(order)
        for topic, phrasing, cset in order[: config.num_rows - len(rows)]:
            rows.append({"key": f"synth-{config.split}-{len(rows):06d}", **make_row(topic, phrasing, cset, rng)})
    return rows


def vocabulary(rows: list[dict[str, Any]]) -> set[str]:
    """Distinct lower-cased words of the rows' teacher answers."""
    return {w.strip('".,').lower() for r in rows for w in r["teacher_response"].split()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the demo's synthetic instruction-following rows.")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--split", default="train", choices=("train", "eval"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        rows = generate_synthetic(SyntheticConfig(num_rows=args.num, split=args.split, seed=args.seed))
        write_jsonl(rows, args.out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": args.out, "rows": len(rows), "vocabulary": len(vocabulary(rows))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
