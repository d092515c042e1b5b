"""Rewards: punkt assets, the ifeval reward and its registry, training prompts, decontamination, synthetic tasks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from uniapl_megatron.assets import PUNKT_TAB_LANGUAGES, ensure_nltk_punkt, write_punkt_tab  # noqa: E402
from uniapl_megatron.eval.ifeval_data import IFEVAL_NUM_PROMPTS, load_ifeval_prompts  # noqa: E402
from uniapl_megatron.rewards import PromptRowError, Reward, RewardConfigError, available_rewards, build_reward  # noqa: E402
from uniapl_megatron.rewards.ifeval import INSTRUCTION_IDS  # noqa: E402
from uniapl_megatron.rewards.prompts import (  # noqa: E402
    CONFLICTS,
    Decontaminator,
    PromptGenConfig,
    describe,
    generate_training_prompts,
    ifeval_decontaminator,
)
from uniapl_megatron.rewards.seed_tasks import SEED_TASKS  # noqa: E402
from uniapl_megatron.rewards.synthetic import SyntheticConfig, generate_synthetic, vocabulary  # noqa: E402

# ---------------------------------------------------------------- assets


def test_punkt_tab_written_idempotent_and_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nltk.data
    from nltk.tokenize import PunktTokenizer
    from punkt.data import load_bundled

    out = write_punkt_tab(tmp_path)
    assert out == tmp_path / "tokenizers" / "punkt_tab"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(PUNKT_TAB_LANGUAGES)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.tab")}
    assert write_punkt_tab(tmp_path) == out  # second call: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tab")} == stamp
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nltk must find and read our copy
    assert Path(nltk.data.find("tokenizers/punkt_tab/english/")) == out / "english"
    tok = PunktTokenizer("english")
    bundled = load_bundled("english")
    assert tok._params.abbrev_types == bundled.abbrev_types
    assert tok._params.collocations == bundled.collocations
    assert tok._params.sent_starters == bundled.sent_starters
    assert dict(tok._params.ortho_context) == bundled.ortho_context
    sents = tok.tokenize("Dr. Smith met Mr. Jones at 5 p.m. today. They talked. It rained!")
    assert len(sents) == 3, sents
    # no leftover temp folders
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".punkt_tab")]


def test_assets_cli_and_default_location(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "uniapl_megatron.assets", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tokenizers/punkt_tab/english/ortho_context.tab").is_file()
    # the project's own set-up location is found by nltk with no NLTK_DATA
    import nltk.data

    found = Path(nltk.data.find("tokenizers/punkt_tab/english/"))
    assert found == ensure_nltk_punkt()
    assert "NLTK_DATA" not in os.environ or found.is_dir()


# ---------------------------------------------------------------- registry and reward


def _row(ids: list[str], kwargs: list[dict], key: int = 0) -> dict:
    return {"key": key, "prompt": "test prompt", "instruction_id_list": ids, "kwargs": kwargs}


def test_registry_builds_by_name_and_rejects_bad_config() -> None:
    assert "ifeval" in available_rewards()
    reward = build_reward("ifeval", {"mode": "loose", "aggregate": "fraction", "seed": 3})
    assert isinstance(reward, Reward) and reward.name == "ifeval"
    with pytest.raises(RewardConfigError, match="unknown reward 'nope'; available: .*ifeval"):
        build_reward("nope")
    with pytest.raises(
        RewardConfigError, match="unknown option.*'?modde'?.*expected some of: aggregate, families, mode, seed"
    ):
        build_reward("ifeval", {"modde": "strict"})
    with pytest.raises(RewardConfigError, match="mode must be one of"):
        build_reward("ifeval", {"mode": "lenient"})
    with pytest.raises(RewardConfigError, match="aggregate must be one of"):
        build_reward("ifeval", {"aggregate": "mean"})


def test_binary_fraction_strict_loose() -> None:
    row = _row(["startend:quotation", "punctuation:no_comma"], [{}, {}])
    both = '"all good here"'
    one = '"all good, here"'  # comma breaks one constraint
    framed = 'Sure:\n"all good here"'  # strict fails the quotation; loose drops the first line
    strict = build_reward("ifeval")
    frac = build_reward("ifeval", {"aggregate": "fraction"})
    loose = build_reward("ifeval", {"mode": "loose"})
    assert strict.score([row] * 4, [both, one, framed, ""]) == [1.0, 0.0, 0.0, 0.0]
    assert frac.score([row] * 4, [both, one, framed, "   "]) == [1.0, 0.5, 0.5, 0.0]
    assert loose.score([row] * 3, [both, one, framed]) == [1.0, 0.0, 1.0]


def test_deterministic_and_leaves_global_random_alone() -> None:
    rows = [r for r in load_ifeval_prompts() if r["key"] in (1122, 1129)]  # letter_frequency with a random letter
    assert len(rows) == 2
    responses = ["zzz " * 20, "a!!!!!! ###### eeee"]
    reward = build_reward("ifeval", {"aggregate": "fraction"})
    random.seed(1234)
    state = random.getstate()
    first = [reward.score(rows, [r] * 2) for r in responses]
    assert random.getstate() == state  # the caller's random stream is untouched
    random.seed(999)  # whatever the caller does with random, scores stay the same
    again = [build_reward("ifeval", {"aggregate": "fraction"}).score(rows, [r] * 2) for r in responses]
    assert first == again


def test_same_scores_across_processes() -> None:
    script = textwrap.dedent(
        """
        import json, random
        from uniapl_megatron.eval.constructed import constructed_responses
        from uniapl_megatron.eval.ifeval_data import load_ifeval_prompts
        from uniapl_megatron.rewards import build_reward
        rows = [r for r in load_ifeval_prompts() if r["key"] in (1122, 1129) or
                any(i.startswith(("language:", "change_case:")) for i in r["instruction_id_list"])][:60]
        rng = random.Random(5)
        pairs = [(r, x) for r in rows for x in constructed_responses(r, rng)]
        rw = build_reward("ifeval", {"aggregate": "fraction", "mode": "loose"})
        print(json.dumps(rw.score([p for p, _ in pairs], [x for _, x in pairs])))
        """
    )
    outs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    assert 0 < sum(outs[0]) < len(outs[0])  # the responses really differ in score


@pytest.mark.parametrize(
    "row, match",
    [
        ("not a row", "prompt row 0: expected a dict"),
        ({"kwargs": [{}]}, "missing field 'instruction_id_list'"),
        ({"instruction_id_list": ["punctuation:no_comma"]}, "missing field 'kwargs'"),
        (_row([], []), "must be a non-empty list of strings"),
        (_row(["punctuation:no_comma"], [{}, {}]), "'kwargs' has 2 entries but 'instruction_id_list' has 1"),
        (_row(["punctuation:no_commas"], [{}]), "unknown instruction id 'punctuation:no_commas'; known: "),
        (_row(["keywords:existence"], [{"keyword": ["a"]}]), "unknown argument 'keyword'; expected some of: keywords"),
        (
            _row(["length_constraints:number_words"], [{"num_words": "ten", "relation": "at least"}]),
            "argument 'num_words' must be an integer",
        ),
        (_row(["keywords:existence"], [{"keywords": "apple"}]), "argument 'keywords' must be a list of strings"),
        (
            _row(["length_constraints:number_words"], [{"num_words": 10, "relation": "more than"}]),
            "length_constraints:number_words: bad arguments",
        ),
        ({**_row(["punctuation:no_comma"], [{}]), "prompt": 5}, "'prompt' must be a string"),
    ],
)
def test_bad_prompt_rows_get_clear_messages(row: object, match: str) -> None:
    with pytest.raises(PromptRowError, match=match):
        build_reward("ifeval").score([row], ["some response"])  # type: ignore[list-item]


def test_bad_response_arguments() -> None:
    row = _row(["punctuation:no_comma"], [{}], key=7)
    with pytest.raises(PromptRowError, match="1 prompt rows but 2 responses"):
        build_reward("ifeval").score([row], ["a", "b"])
    with pytest.raises(PromptRowError, match=r"prompt row 0 \(key 7\): response must be a string"):
        build_reward("ifeval").score([row], [None])  # type: ignore[list-item]


# ---------------------------------------------------------------- training prompts


@pytest.fixture(scope="module")
def generated() -> tuple[list[dict], dict]:
    return generate_training_prompts(PromptGenConfig(num_prompts=600, seed=7))


def test_generated_prompts_carry_checkable_constraints(generated: tuple[list[dict], dict]) -> None:
    rows, stats = generated
    assert len(rows) == 600 and len({r["prompt"] for r in rows}) == 600
    assert {i for r in rows for i in r["instruction_id_list"]} == set(INSTRUCTION_IDS)  # all 25 types
    for r in rows:
        assert r["seed_task"] in SEED_TASKS and r["prompt"].startswith(r["seed_task"])
        assert 1 <= len(r["instruction_id_list"]) <= 3
        # the prompt states each constraint in the checker's own words, rebuilt from the row's kwargs
        for text in describe(r["instruction_id_list"], r["kwargs"]):
            assert text in r["prompt"]
        ids = r["instruction_id_list"]
        for a in ids:
            assert not any(b in CONFLICTS[a] for b in ids if b is not a)
    # the rows are scorable and a response can follow them (constructed attempt) or not
    from uniapl_megatron.eval.constructed import follow_attempt

    rng = random.Random(0)
    scores = build_reward("ifeval").score(rows, [follow_attempt(r, rng) for r in rows])
    assert 0.3 < sum(scores) / len(scores) < 1.0


def test_generation_is_seeded(generated: tuple[list[dict], dict]) -> None:
    rows, _ = generated
    again, _ = generate_training_prompts(PromptGenConfig(num_prompts=50, seed=7))
    assert again == rows[:50]
    other, _ = generate_training_prompts(PromptGenConfig(num_prompts=50, seed=8))
    assert [r["prompt"] for r in other] != [r["prompt"] for r in again]


def test_no_training_prompt_matches_an_ifeval_prompt(generated: tuple[list[dict], dict]) -> None:
    rows, stats = generated
    eval_rows = load_ifeval_prompts()
    assert len(eval_rows) == IFEVAL_NUM_PROMPTS
    assert ifeval_decontaminator().check_rows(rows) == []
    eval_texts = {" ".join(r["prompt"].lower().split()) for r in eval_rows}
    assert not any(" ".join(r["prompt"].lower().split()) in eval_texts for r in rows)
    assert stats["seed_tasks_contaminated"] == 0


def test_decontamination_catches_eval_text() -> None:
    deco = ifeval_decontaminator()
    ev = load_ifeval_prompts()[3]["prompt"]
    assert deco.reason(ev) == "identical to an evaluation prompt"
    assert deco.reason(ev.upper().replace(".", " ! ")) == "identical to an evaluation prompt"
    first_words = " ".join(ev.split()[:12])
    lower = "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."
    assert "with an evaluation prompt" in deco.reason(f"{first_words} {lower}", [lower])
    # the checkers' own descriptions are shared with IFEval by design and do not count ...
    clean = f"{SEED_TASKS[0]} {lower}"
    assert deco.reason(clean, [lower]) is None
    # ... but only when they are declared as this prompt's constraint text
    assert deco.reason(clean) is not None
    short = " ".join(ev.split()[:5])
    assert "occur in an evaluation prompt" in deco.reason(short)
    # the generator drops a contaminated seed task and never emits it
    rows, stats = generate_training_prompts(
        PromptGenConfig(num_prompts=20, seed=0, seed_tasks=[first_words, *SEED_TASKS[:5]]), deco
    )
    assert stats["seed_tasks_contaminated"] == 1
    assert not any(r["seed_task"] == first_words for r in rows)
    with pytest.raises(ValueError, match="every seed task matches an evaluation prompt"):
        generate_training_prompts(PromptGenConfig(num_prompts=5, seed_tasks=[first_words]), deco)
    assert (
        Decontaminator(["alpha beta gamma delta epsilon zeta eta theta"]).reason(
            "x alpha beta gamma delta epsilon zeta eta theta y"
        )
        is not None
    )


def test_prompt_generator_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from uniapl_megatron.rewards import prompts

    out = tmp_path / "p.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uniapl_megatron.rewards.prompts",
            "--num",
            "30",
            "--out",
            str(out),
            "--exclude",
            "language:response_language",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 30 and json.loads(r.stdout.splitlines()[-1])["rows"] == 30
    assert not any("language:response_language" in x["instruction_id_list"] for x in rows)
    assert prompts.main(["--num", "3", "--out", str(out), "--exclude", "no:such"]) == 1
    assert "unknown instruction id(s) ['no:such']" in capsys.readouterr().err


# ---------------------------------------------------------------- synthetic tasks


def test_synthetic_teacher_answers_all_score_one() -> None:
    reward = build_reward("ifeval")
    for split, n in (("train", 900), ("eval", 300)):  # more than the split's combinations
        rows = generate_synthetic(SyntheticConfig(num_rows=n, split=split, seed=3))
        assert reward.score(rows, [r["teacher_response"] for r in rows]) == [1.0] * len(rows)
        assert max(len(r["teacher_response"].split()) for r in rows) <= 12
        assert all(1 <= len(r["instruction_id_list"]) <= 2 for r in rows)
        assert set(rows[0]) == {"key", "prompt", "instruction_id_list", "kwargs", "teacher_response"}
    assert len(vocabulary(rows)) <= 80


def test_synthetic_reward_discriminates_and_splits_are_disjoint() -> None:
    train = generate_synthetic(SyntheticConfig(num_rows=400, split="train"))
    evl = generate_synthetic(SyntheticConfig(num_rows=400, split="eval"))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evl}
    rng = random.Random(0)
    shuffled = [r["teacher_response"] for r in train]
    rng.shuffle(shuffled)  # answers to other prompts mostly break this prompt's constraints
    mean = sum(build_reward("ifeval").score(train, shuffled)) / len(train)
    assert mean < 0.6
    assert generate_synthetic(SyntheticConfig(num_rows=50, seed=1)) == generate_synthetic(
        SyntheticConfig(num_rows=50, seed=1)
    )
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        SyntheticConfig(split="test")
