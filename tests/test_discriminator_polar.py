"""POLAR discriminator: a tiny random checkpoint in POLAR's layout (tests/_polar.py says what is real)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from _polar import reference_score, write_polar_folder
from _tools import load_tool
from safetensors.torch import load_file, save_file

from uniapl_megatron.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    DiscriminatorError,
    PolarDiscriminator,
    build_discriminator,
)
from uniapl_megatron.discriminator.polar import as_text, polar_text, token_budget_batches

# POLAR's README: its data-format example and its two worked examples (prompt, reference, outputs).
README_CHINA = {
    "prompt": [{"role": "user", "content": "What is the capital of China?"}],
    "reference": [{"role": "assistant", "content": "Beijing."}],
    "outputs": [[{"role": "assistant", "content": "Beijing."}], [{"role": "assistant", "content": "Shanghai."}]],
}
STRAWBERRY_P = "How many 'r's are there in the word 'strawberry'?"
STRAWBERRY_R = (
    "There are 3 'r's in the word 'strawberry'. Here's how we can count them: 's', 't', 'r', 'a', 'w', "
    "'b', 'e', 'r', 'r', 'y'. So, the answer is 3."
)
_COUNT = "Let's count the 'r's in 'strawberry': 's', 't', 'r', 'a', 'w', 'b', 'e', 'r', 'r', 'y'. "
STRAWBERRY_OUT = [
    STRAWBERRY_R,
    _COUNT + "There are three 'r's, so the answer is three.",
    _COUNT + "There are two 'r's, so the answer is two.",
    _COUNT + "There are three 'r's, so the answer is two.",
    _COUNT + "There are two 'r's, so the answer is three.",
    "There are 3 'r's in the word 'strawberry'.",
    "There are 2 'r's in the word 'strawberry'.",
]
DUNE_P = "Summarize the first book of Frank Herbert’s Dune in one witty short sentence."
DUNE_R = "Royal teen discovers that life’s a beach—minus the ocean, plus spice, giant sandworms and deadly politics."
DUNE_OUT = [
    DUNE_R,
    "Royal teen discovers that life’s a beach—minus the ocean, plus magic, dark wizards and deadly politics.",
    "Young noble’s move to desert planet turns into galactic Game of Thrones with fewer dragons, more worms.",
    "A noble family’s fall sparks a young heir’s rise as a leader on a harsh desert planet governed by prophecy "
    "and survival.",
    "Paul Atreides loses his father, gains prophetic powers, learns to ride a sandworm, leads a holy war, and "
    "discovers that being the chosen one comes with a lot of blood, sand, and questionable decisions.",
    "Boy gets planet, becomes god, loses soul — family drama ensues across galaxies.",
]


def _readme_triples() -> list[tuple[str, str, str]]:
    out = [
        (as_text(README_CHINA["prompt"]), as_text(README_CHINA["reference"]), as_text(o))
        for o in README_CHINA["outputs"]
    ]
    out += [(STRAWBERRY_P, STRAWBERRY_R, o) for o in STRAWBERRY_OUT]
    out += [(DUNE_P, DUNE_R, o) for o in DUNE_OUT]
    return out


@pytest.fixture(scope="module")
def polar(tmp_path_factory):
    folder = tmp_path_factory.mktemp("polar") / "POLAR-tiny"
    cfg, weights = write_polar_folder(folder)
    disc = build_discriminator(
        DiscriminatorConfig(
            kind="polar",
            path=str(folder),
            device="cpu",
            dtype="float32",
            max_length=4096,
            max_tokens_per_batch=300,
            batch_size=4,
        )
    )
    return folder, cfg, weights, disc


def test_encoding_is_polars_documented_format_on_its_readme_examples(polar):
    _, _, _, disc = polar
    # Written out by hand from the README's first example and the client's _encode (sft wrapper).
    assert disc.encoder.text("What is the capital of China?", "Beijing.", "Shanghai.") == (
        "What is the capital of China?\nBeijing.<|reward|>What is the capital of China?\nShanghai.[UNUSED_TOKEN_130]"
    )
    for p, r, c in _readme_triples():
        expected = p + "\n" + r + "<|reward|>" + p + "\n" + c + "[UNUSED_TOKEN_130]"
        assert disc.encoder.text(p, r, c) == expected
        assert polar_text(p, r, c) == expected
    assert polar_text("P", "R", "C", wrapper="pretrain") == "PR<|reward|>PC[UNUSED_TOKEN_130]"
    ids = disc.encoder.encode(["What is the capital of China?"], ["Beijing."], ["Beijing."])[0]
    tok = disc.encoder.tokenizer
    assert ids[0] == tok.convert_tokens_to_ids("<s>") and ids[-1] == disc.encoder.reward_token_id


def test_scores_equal_an_independent_internlm2_forward(polar):
    _, cfg, weights, disc = polar
    assert isinstance(disc, Discriminator) and isinstance(disc, PolarDiscriminator)
    triples = _readme_triples()
    p, r, c = (list(x) for x in zip(*triples))
    scores = disc.score(p, r, c)
    ids = disc.encoder.encode(p, r, c)
    # several batches of mixed lengths, so padding is exercised
    assert len(token_budget_batches([len(x) for x in ids], 300, 4)) > 3
    ref = [reference_score(cfg, weights, x) for x in ids]
    assert torch.allclose(torch.tensor(scores), torch.tensor(ref), rtol=1e-4, atol=1e-4), (scores, ref)
    assert len(set(round(s, 3) for s in scores)) > len(scores) // 2  # not a constant
    # each alone = in a batch
    alone = [disc.score([a], [b], [d])[0] for a, b, d in triples[:4]]
    assert torch.allclose(torch.tensor(alone), torch.tensor(scores[:4]), atol=1e-5)


def test_bfloat16_scores_track_float32(polar):
    folder, _, _, disc32 = polar
    disc16 = build_discriminator(
        DiscriminatorConfig(kind="polar", path=str(folder), device="cpu", dtype="bfloat16", max_length=4096)
    )
    assert disc16.model.v_head.weight.dtype == torch.bfloat16
    assert disc16.model.model.rotary_emb.inv_freq.dtype == torch.float32
    p, r, c = (list(x) for x in zip(*_readme_triples()[:6]))
    a, b = torch.tensor(disc32.score(p, r, c)), torch.tensor(disc16.score(p, r, c))
    assert (a - b).abs().max() < 0.1 * a.abs().max() + 0.1, (a, b)


def test_truncation_follows_polars_client(polar):
    folder, _, _, _ = polar
    disc = build_discriminator(
        DiscriminatorConfig(
            kind="polar",
            path=str(folder),
            device="cpu",
            max_length=64,
            max_candidate_tokens=10,
            max_reference_tokens=10,
        )
    )
    enc = disc.encoder
    tok = enc.tokenizer
    prompt = " ".join(f"word{i}" for i in range(80))
    answer = " ".join(f"ans{i}" for i in range(40))
    r_ids = tok(answer, add_special_tokens=True)["input_ids"][:10]  # right cut, BOS counts
    p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    budget = (64 - 4 - 10 - 10) // 2
    p_cut = tok.decode(p_ids[-budget:], skip_special_tokens=True)
    a_cut = tok.decode(r_ids, skip_special_tokens=True)
    assert enc.text(prompt, answer, answer) == f"{p_cut}\n{a_cut}<|reward|>{p_cut}\n{a_cut}[UNUSED_TOKEN_130]"
    assert enc.truncated_fields == 3


def _break(folder: Path, tmp: Path, how: str) -> Path:
    dst = tmp / how
    shutil.copytree(folder, dst, copy_function=os.symlink)  # links: a file changed below is unlinked first
    if how == "missing_tensor":
        f = dst / "model-00001-of-00002.safetensors"
        t = load_file(str(f))
        t.pop(sorted(t)[0])
        f.unlink()
        save_file(t, str(f))
    elif how == "extra_tensor":
        save_file({"model.layers.0.attention.extra.weight": torch.zeros(2)}, str(dst / "extra.safetensors"))
    elif how == "pickle_only":
        for f in dst.glob("*.safetensors"):
            f.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"x")
    elif how in ("wrong_reward_id", "wrong_arch", "wrong_shape"):
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").unlink()
        if how == "wrong_reward_id":
            cfg["reward_token_id"] = 5
        elif how == "wrong_arch":
            cfg["architectures"] = ["InternLM2ForCausalLM"]
        else:
            cfg["intermediate_size"] = 100
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing_tensor", "missing"),
        ("extra_tensor", "does not use"),
        ("pickle_only", "pickle files are never loaded"),
        ("wrong_reward_id", "must agree"),
        ("wrong_arch", "InternLM2ForRewardModel"),
        ("wrong_shape", "has shape"),
    ],
)
def test_bad_polar_folders_are_refused_with_a_reason(polar, tmp_path, how, message):
    folder = _break(polar[0], tmp_path, how)
    with pytest.raises(DiscriminatorError, match=message):
        build_discriminator(DiscriminatorConfig(kind="polar", path=str(folder), device="cpu", max_length=4096))


def test_polar_settings_are_checked(polar):
    folder = str(polar[0])
    with pytest.raises(DiscriminatorError, match="max_position_embeddings"):
        build_discriminator(DiscriminatorConfig(kind="polar", path=folder, device="cpu", max_length=8192))
    with pytest.raises(DiscriminatorError, match="kind: polar"):
        build_discriminator(DiscriminatorConfig(kind="frozen", path=folder, device="cpu"))
    with pytest.raises(DiscriminatorError, match="own input format"):
        DiscriminatorConfig(kind="polar", path=folder, template="{candidate}")
    with pytest.raises(DiscriminatorError, match="polar_wrapper"):
        DiscriminatorConfig(kind="polar", path=folder, polar_wrapper="chat")


def test_score_discriminator_tool(polar, tmp_path, capsys):
    folder, cfg, weights, disc = polar
    tool = load_tool("score_discriminator")
    rows = [{"prompt": p, "reference": r, "response": c} for p, r, c in _readme_triples()[:5]]
    src = tmp_path / "triples.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in rows))
    argv = ["--disc", str(folder), "--input", str(src), "--dtype", "float32", "--device", "cpu"]
    with pytest.raises(DiscriminatorError):  # POLAR's own 16384 exceeds the tiny model's 4096 positions
        tool.run(tool.parse_args(argv))
    cfg_file = folder / "config.json"
    saved = cfg_file.read_text()
    cfg_file.write_text(json.dumps({**cfg, "max_position_embeddings": 16384}))
    try:
        assert tool.main(argv) == 0
    finally:
        cfg_file.write_text(saved)
    out = capsys.readouterr().out.strip().splitlines()
    scores = [float(x) for x in out[:-1]]
    summary = json.loads(out[-1])
    expected = disc.score(*[[r[k] for r in rows] for k in ("prompt", "reference", "response")])
    assert torch.allclose(torch.tensor(scores), torch.tensor(expected), atol=1e-5)
    assert summary["count"] == 5 and summary["kind"] == "polar"
    assert abs(summary["mean"] - sum(expected) / 5) < 1e-5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "reference": "y"}) + "\n")
    assert tool.main(["--disc", str(folder), "--input", str(bad)]) == 2
    assert f"{bad}:2: missing field 'response'" in capsys.readouterr().err


def test_recipes_name_polar_and_ifbench_capable_data_and_pass_the_planner():
    from _tools import REPO

    from uniapl_megatron.trainer.config import load_config

    planner = load_tool("plan_memory")
    for name in ("qwen3_0p6b_32x8", "qwen3_4b_32x8", "qwen3_8b_32x8"):
        path = REPO / "examples" / f"{name}.yaml"
        c = load_config(path)
        assert c.discriminator.kind == "polar" and c.discriminator.path.endswith("POLAR-1_8B")
        assert c.reward.name == "ifeval" and "ifbench" in c.reward.options["families"]
        assert c.data.prompt_paths and c.data.require_teacher_response
        plan, notes = planner.plan_recipe(
            planner.load_recipe(str(path)), str(path), nodes=32, gpus_per_node=8, gpu_bytes=79.6 * 2**30
        )
        assert plan is not None and plan.fits, (name, notes)
        assert any("discriminator (polar" in k for k in plan.worst.parts), plan.worst.parts
