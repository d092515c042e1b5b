"""Activation recomputation (model.recompute) changes memory, not results: selective and full give the same
loss and updated weights as none, through the packed (thd) attention and the chunked log-prob head."""

from __future__ import annotations

from pathlib import Path

import pytest
from _models import tiny_qwen3
from _train_step import max_diff, train_step

# fp32 and the same layout on both sides: recomputation reruns the same ops on the same inputs, so the
# weights usually come out bit-identical on CPU. Under heavy load one CI run saw 7.7e-6 (CPU kernels are not
# bit-deterministic across thread schedules), so the bound is test_trainer.py's layout tolerance, still far
# below the step's own size (> 1e-3).
TOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("hf") / "m", tie=False, vocab=256)


@pytest.mark.parametrize(
    "world,layout",
    [
        (1, ["--chunk-tokens", "16"]),  # several log-prob chunks: the head's own recomputation runs inside
        (2, ["--tp", "2", "--sp"]),
        (2, ["--pp", "2", "--mb-tokens", "48"]),  # 4 micro-batches through the pipeline schedule
    ],
    ids=["tp1-chunked-head", "tp2-sp", "pp2-4mb"],
)
def test_recompute_gives_the_same_step(model, tmp_path, world, layout):
    ref, ref_m = train_step(model, tmp_path / "none", world, *layout)
    assert ref_m["layer_forwards"] == 1 and ref_m["core_attn_forwards"] == 1
    expected = {"selective": (1, 2), "full": (2, 2)}  # forwards per layer and step: what is rerun runs twice
    for mode, (layer_fwd, attn_fwd) in expected.items():
        got, m = train_step(model, tmp_path / mode, world, *layout, "--recompute", mode)
        assert (m["layer_forwards"], m["core_attn_forwards"]) == (layer_fwd, attn_fwd), (mode, m)
        assert abs(m["loss/total"] - ref_m["loss/total"]) <= TOL, (mode, m, ref_m)
        diff = max_diff(got, ref)
        assert diff <= TOL, f"recompute={mode} {layout}: weights differ from recompute=none by {diff}"


def test_full_recompute_in_blocks_of_layers(model, tmp_path):
    ref, _ = train_step(model, tmp_path / "none", 1)
    got, m = train_step(model, tmp_path / "full2", 1, "--recompute", "full", "--recompute-layers", "2")
    assert m["layer_forwards"] == 2
    assert max_diff(got, ref) <= TOL
