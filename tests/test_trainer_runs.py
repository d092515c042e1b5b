"""Real `uniapl train` runs of the tiny default (examples/tiny_cpu.yaml, its student, discriminator and
synthetic data), each short, for what only a whole run shows:
- a staged preset (sft -> a_grpo in the reward-shaping mode, KL to a reference model): the switch counts
  optimizer updates, the learning rate changes to the second stage's, the KL reference is reset to the
  student at the switch, the discriminator's score shapes the reward (no separate term);
- SIGTERM: the run saves a checkpoint of the finished step and exits 0 (an sft run with no prompt file, two
  minibatches per step, whose metrics are combined over the updates);
- train.max_nonfinite_in_row: a diverging run stops with its message."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from _runs import TINY, cli, metrics

# No held-out evaluation: these runs test the step, and an sft run has no engine to evaluate with.
SMALL = [
    "data.prompts_per_step=2",
    "data.demos_per_step=4",
    "sampling.group_size=2",
    "sampling.max_new_tokens=6",
    "train.tensorboard=false",
    "train.plot=false",
    "data.eval_prompt_paths=[]",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from uniapl_megatron.demo import prepare

    return prepare(tmp_path_factory.mktemp("assets"), train_rows=60)


def _base(assets: dict[str, str], out, *extra: str) -> list[str]:
    return cli(
        "train",
        str(TINY),
        f"model.hf_path={assets['student']}",
        f"discriminator.path={assets['discriminator']}",
        f"data.demo_paths=[{assets['data']}]",
        f"data.prompt_paths=[{assets['data']}]",
        f"train.output_dir={out}",
        *SMALL,
        *extra,
    )


def _model_weights(folder, keys=None) -> dict:
    """The tensors of a Megatron (torch_dist) checkpoint folder, read with torch's own checkpoint reader."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(str(folder)).read_metadata()
    sd = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and (keys is None or k in keys)
    }
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    return sd


def test_staged_switch_lr_reference_reset_kl_and_reward_shaping(assets, tmp_path):
    out = tmp_path / "staged"
    # Two minibatches: 2 optimizer updates per step, so the switch at update 4 is the start of step 3 (of 4).
    args = _base(
        assets,
        out,
        "objective.algorithm=sft->a_grpo",
        "objective.stage_switch_step=4",
        "objective.adversarial_mode=reward",
        "objective.kl_coef=0.05",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "stage2.lr=2e-3",
        "train.minibatches=2",
        "train.steps=4",
        "train.save_every=2",
        "train.keep_last=2",
    )
    p = subprocess.run(args, check=False, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    sft, rl = m[:2], m[2:]
    assert all(r.get("stage_sft") == 1.0 for r in sft) and all(r.get("stage_a_grpo") == 1.0 for r in rl)
    # The learning rate is the first stage's up to the switch and the second stage's after it.
    assert [r["lr"] for r in m] == pytest.approx([1e-2, 1e-2, 2e-3, 2e-3], rel=1e-6)
    assert (
        "stage switch at optimizer update 4 (step 2)" in p.stdout and "KL reference = the current student" in p.stdout
    )
    # The reference reset: the KL reference saved at the switch is exactly the model after the first stage
    # (the checkpoint of step 2), not the initial weights; the second stage then moves away from it.
    ck = out / "checkpoints"
    ref = _model_weights(ck / "stage2_reference")
    at_switch, end = (
        _model_weights(ck / "step_000002" / "model", set(ref)),
        _model_weights(ck / "step_000004" / "model", set(ref)),
    )
    assert len(ref) >= 8 and all((ref[k] == at_switch[k]).all() for k in ref)
    assert max((ref[k] - end[k]).abs().max().item() for k in ref) > 1e-3
    # KL to that reference, on rollout tokens only.
    assert all("kl" not in r for r in sft)
    assert all(r["kl"] > 0 and r["loss/kl"] == pytest.approx(0.05 * r["kl"], rel=1e-5) for r in rl)
    # Reward shaping: the discriminator scored the rollouts, and its score enters the reward, not a term.
    assert all("disc/score_mean" in r and "loss/pg" in r and "loss/adv" not in r for r in rl)
    assert all("disc/score_mean" not in r for r in sft)
    # Resuming inside the second stage: its schedule state loads into the second stage's schedule (Megatron
    # refuses a mismatch) and the reference comes back from disk. (The torch engine here only to start fast;
    # no step is left to sample.)
    again = subprocess.run([*args, "rollout.engine=torch"], check=False, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "(step 4)" in again.stdout
    assert metrics(out) == m


def test_sigterm_saves_then_exits(assets, tmp_path):
    out = tmp_path / "sigterm"
    # sft with no prompt file: the preset implies data.prompts_per_step 0 and starts no engine.
    args = _base(
        assets,
        out,
        "objective.algorithm=sft",
        "data.prompt_paths=[]",
        "train.minibatches=2",
        "train.steps=500",
        "train.save_every=500",
    )
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(metrics(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    m = metrics(out)
    done = len(m)
    assert f"signal {signal.SIGTERM}: saved step {done}, exiting" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{done:06d}"
    assert (out / "checkpoints" / f"step_{done:06d}" / "trainer_state.json").is_file()
    # Two updates per step: the logged grad_norm is their mean, grad_norm/max the larger one.
    assert all(0 < r["grad_norm"] <= r["grad_norm/max"] for r in m) and all(r["skipped"] == 0 for r in m)
    assert all(r["stage_sft"] == 1.0 and "reward/mean" not in r for r in m)


def test_max_nonfinite_in_row_stops_the_run(assets, tmp_path):
    out = tmp_path / "nan"
    # lr 1e30 from the first update: the weights blow up and the losses turn NaN/inf, each such step skipped.
    p = subprocess.run(
        _base(
            assets,
            out,
            "objective.algorithm=sft",
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "optim.clip_grad=0",
            "train.max_nonfinite_in_row=2",
            "train.steps=10",
            "train.save_every=10",
        ),
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    said = re.search(
        r"error: step (\d+): 2 steps in a row had a NaN/inf loss or were skipped "
        r"\(train.max_nonfinite_in_row=2\); stopping",
        p.stderr,
    )
    assert said, p.stderr[-3000:]
    m = metrics(out)
    assert len(m) == int(said.group(1)) + 1 < 10  # stopped at once, not at the end of the run
    assert [r["nonfinite_in_row"] for r in m[-2:]] == [1, 2] and all(r["skipped"] == 1 for r in m[-2:])
    assert not (out / "checkpoints" / "latest").exists()  # nothing broken was saved


def test_step_metrics_combine_the_updates():
    from uniapl_megatron.trainer.batch import combine_updates

    got = combine_updates(
        [
            {"loss/total": 1.0, "sft/nll": 3.0, "grad_norm": 2.0, "lr": 0.1, "skipped": 0.0},
            {"loss/total": 3.0, "sft/nll": 5.0, "grad_norm": 6.0, "lr": 0.2, "skipped": 1.0},
        ]
    )
    assert got == {"loss/total": 2.0, "sft/nll": 4.0, "grad_norm": 4.0, "grad_norm/max": 6.0, "lr": 0.2, "skipped": 1.0}
    one = {"loss/total": 1.5, "grad_norm": 2.0, "lr": 0.1, "skipped": 0.0}
    assert combine_updates([one]) == one
