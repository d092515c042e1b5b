"""Constructed responses to IFEval-style prompt rows, for tests, benchmarks and smoke runs.

``constructed_responses(row, rng)`` returns varied responses to one row: one built to follow
each of the row's constraints (from its kwargs), then variants that break or bend them
(case changes, markdown lines around it for the loose mode, stars, another language, JSON,
two answers, empty). No model involved; deterministic given ``rng``.
"""

from __future__ import annotations

import json
import random
from typing import Any, Mapping

_FILLER = (
    "the river runs past the old mill and the town grows quiet at night while people walk home "
    "slowly under bright lamps and talk about the day they had with friends and family"
).split()
_FOREIGN = {
    "fr": "Le chat dort sur la chaise pendant que la pluie tombe doucement dehors.",
    "de": "Der Hund schläft im Garten und die Kinder spielen draußen mit dem Ball.",
    "es": "El perro duerme en el jardín mientras los niños juegan con la pelota.",
    "it": "Il gatto dorme sulla sedia mentre la pioggia cade piano fuori dalla finestra.",
    "pt": "O gato dorme na cadeira enquanto a chuva cai lá fora devagar.",
    "ru": "Кошка спит на стуле, а за окном тихо идёт дождь.",
    "hi": "बिल्ली कुर्सी पर सो रही है और बाहर धीरे धीरे बारिश हो रही है।",
    "ja": "猫は椅子の上で眠っていて、外では静かに雨が降っています。",
    "ko": "고양이는 의자 위에서 자고 밖에는 조용히 비가 내리고 있습니다.",
    "ar": "القطة نائمة على الكرسي والمطر يتساقط بهدوء في الخارج.",
}


def _sentences(rng: random.Random, n: int, words_per: int = 8) -> list[str]:
    out = []
    for _ in range(n):
        ws = [rng.choice(_FILLER) for _ in range(words_per)]
        out.append(" ".join(ws).capitalize() + ".")
    return out


def follow_attempt(row: Mapping[str, Any], rng: random.Random) -> str:
    """A response assembled to follow the row's constraints where its kwargs make that easy."""
    ids = row["instruction_id_list"]
    kws = [{k: v for k, v in kw.items() if v is not None} for kw in row["kwargs"]]
    by_id = dict(zip(ids, kws))
    # rng is drawn in a fixed order (body, paragraphs, then format), so a seed gives the same response.
    body, n_par = _body(by_id, rng)
    text = " ".join(body + _extras(by_id))
    if "keywords:forbidden_words" in by_id:
        for w in by_id["keywords:forbidden_words"].get("forbidden_words", []):
            text = text.replace(w, "")
    if n_par:
        text = _paragraphs(text, by_id, n_par, rng)
    return _formatted(text, by_id, rng)


def _body(by_id: Mapping[str, dict[str, Any]], rng: random.Random) -> tuple[list[str], int | None]:
    """(sentences sized to the length constraints, paragraphs wanted or None)."""
    body = _sentences(rng, 3)
    n_par = None
    for iid, kw in by_id.items():
        if iid == "length_constraints:number_sentences":
            n = kw.get("num_sentences", 3)
            body = _sentences(rng, max(1, n - 1) if kw.get("relation") == "less than" else n + 1)
        elif iid == "length_constraints:number_words":
            n = kw.get("num_words", 50)
            k = max(1, n // 9 - 1) if kw.get("relation") == "less than" else n // 8 + 2
            body = _sentences(rng, k)
        elif iid in ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"):
            n_par = kw.get("num_paragraphs", 2)
    return body, n_par


def _extras(by_id: Mapping[str, dict[str, Any]]) -> list[str]:
    """Phrases that satisfy the keyword, placeholder, highlight and capital-word counts."""
    extra: list[str] = []
    for iid, kw in by_id.items():
        if iid == "keywords:existence":
            extra += [f"It is about {k}." for k in kw.get("keywords", [])]
        elif iid == "keywords:frequency" and kw.get("relation") == "at least":
            extra.append(" ".join([kw.get("keyword", "word")] * kw.get("frequency", 1)) + ".")
        elif iid == "keywords:letter_frequency" and kw.get("let_relation") == "at least":
            extra.append(kw.get("letter", "a") * kw.get("let_frequency", 1) + ".")
        elif iid == "detectable_content:number_placeholders":
            extra.append(" ".join(f"[field{i}]" for i in range(kw.get("num_placeholders", 1))))
        elif iid == "detectable_format:number_highlighted_sections":
            extra += [f"*part {i}*" for i in range(kw.get("num_highlights", 1))]
        elif iid == "change_case:capital_word_frequency" and kw.get("capital_relation") == "at least":
            extra.append(" ".join(["NOTE"] * kw.get("capital_frequency", 1)))
    return extra


def _paragraphs(text: str, by_id: Mapping[str, dict[str, Any]], n_par: int, rng: random.Random) -> str:
    """`text` and n_par - 1 more paragraphs, split the way the paragraph constraint counts them."""
    chunks = [text] + _sentences(rng, n_par - 1)
    fw = by_id.get("length_constraints:nth_paragraph_first_word", {})
    if fw:
        nth = fw.get("nth_paragraph", 1)
        if 1 <= nth <= len(chunks):
            chunks[nth - 1] = f"{fw.get('first_word', 'so')} {chunks[nth - 1]}"
    sep = "\n\n" if fw else "\n***\n"
    return sep.join(chunks)


def _formatted(text: str, by_id: Mapping[str, dict[str, Any]], rng: random.Random) -> str:
    """`text` with the row's format constraints applied (sections, lists, title, case, JSON, quotes, ...)."""
    if "detectable_format:multiple_sections" in by_id:
        kw = by_id["detectable_format:multiple_sections"]
        spl = kw.get("section_spliter", "Section")
        sections = [text] + _sentences(rng, kw.get("num_sections", 1) - 1)
        text = "\n".join(f"{spl} {i + 1}\n{s}" for i, s in enumerate(sections))
    if "detectable_format:number_bullet_lists" in by_id:
        bullets = _sentences(rng, by_id["detectable_format:number_bullet_lists"].get("num_bullets", 1), 4)
        text += "\n" + "\n".join(f"* {s}" for s in bullets)
    if "detectable_format:title" in by_id:
        text = "<<A Short Title>>\n" + text
    if "combination:repeat_prompt" in by_id:
        text = by_id["combination:repeat_prompt"].get("prompt_to_repeat", "") + "\n" + text
    if "detectable_content:postscript" in by_id:
        text += f"\n{by_id['detectable_content:postscript'].get('postscript_marker', 'P.S.')} see you soon."
    if "combination:two_responses" in by_id:
        text = text + "\n******\n" + " ".join(_sentences(rng, 2))
    if "startend:end_checker" in by_id:
        text += " " + by_id["startend:end_checker"].get("end_phrase", "")
    if "punctuation:no_comma" in by_id:
        text = text.replace(",", "")
    if "language:response_language" in by_id:
        text = _FOREIGN.get(by_id["language:response_language"].get("language", ""), text)
    if "change_case:english_lowercase" in by_id:
        text = text.lower()
    if "change_case:english_capital" in by_id:
        text = text.upper()
    if "detectable_format:json_format" in by_id:
        text = "```json\n" + json.dumps({"answer": text}) + "\n```"
    if "startend:quotation" in by_id:
        text = f'"{text}"'
    if "detectable_format:constrained_response" in by_id:
        text = rng.choice(["My answer is yes.", "My answer is no.", "My answer is maybe.", "Maybe."])
    return text


def constructed_responses(row: Mapping[str, Any], rng: random.Random) -> list[str]:
    """Varied responses to ``row`` (see the module doc); 9 of them."""
    good = follow_attempt(row, rng)
    plain = " ".join(_sentences(rng, rng.randint(1, 12)))
    return [
        good,
        plain,
        good.lower(),
        good.upper(),
        f"Sure, here is my answer:\n{good}\nI hope this helps*",  # loose mode strips these lines
        good.replace("*", "**") + ", and more",
        rng.choice(list(_FOREIGN.values())),
        f"{plain}\n******\n{good}",
        rng.choice(["", "   \n", json.dumps({"text": plain})]),
    ]
