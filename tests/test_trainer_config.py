"""What a preset implies for the rest of the config, and the combinations refused at start-up with a message
that says how to fix them (trainer/config.py check_run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from uniapl_megatron.models.arch import ConfigError
from uniapl_megatron.trainer.config import load_config

DISC = "discriminator: {kind: online, path: disc}\n"
ROLLOUT = "rollout: {engine: vllm}\n"


def _load(tmp_path, text: str, *overrides: str):
    f = tmp_path / "c.yaml"
    f.write_text("model: {hf_path: m}\n" + text)
    return load_config(f, list(overrides))


def test_sft_needs_no_prompt_file_and_grpo_no_demo_file(tmp_path):
    c = _load(tmp_path, "objective: {algorithm: sft}\ndata: {demo_paths: [d.jsonl]}\n")
    assert c.data.prompts_per_step == 0 and c.data.demos_per_step == 8
    c = _load(tmp_path, "objective: {algorithm: grpo}\ndata: {prompt_paths: [p.jsonl]}\n" + ROLLOUT)
    assert c.data.demos_per_step == 0 and c.data.prompts_per_step == 8
    assert not c.data.require_teacher_response  # no discriminator in grpo
    # sft with a held-out set keeps its engine: the evaluation samples through it (the sweep's sft cells).
    c = _load(
        tmp_path, "objective: {algorithm: sft}\ndata: {demo_paths: [d.jsonl], eval_prompt_paths: [e.jsonl]}\n" + ROLLOUT
    )
    assert c.data.prompts_per_step == 0 and c.rollout is not None
    assert _load(tmp_path, "objective: {algorithm: sft}\ndata: {demo_paths: [d.jsonl]}\n" + ROLLOUT).rollout is None


def test_adversarial_presets_need_a_discriminator_and_teacher_answers(tmp_path):
    for algo in ("a_sft", "a_grpo", "a_chord", "uniapl", "sft->a_grpo", "a_sft->a_grpo"):
        text = (
            f"objective: {{algorithm: {algo!r}, stage_switch_step: 2}}\n"
            "data: {demo_paths: [d.jsonl], prompt_paths: [p.jsonl]}\n" + ROLLOUT
        )
        with pytest.raises(ConfigError, match=r"no discriminator section: add one .*or set objective.lambda_adv: 0"):
            _load(tmp_path, text)
        # The reward-shaping mode scores rollouts too.
        with pytest.raises(ConfigError, match="no discriminator section"):
            _load(tmp_path, text, "objective.adversarial_mode=reward")
        assert _load(tmp_path, text + DISC).data.require_teacher_response  # implied: a missing one is a bad line
        with pytest.raises(ConfigError, match="data.require_teacher_response=false, but .* teacher's answer"):
            _load(tmp_path, text + DISC, "data.require_teacher_response=false")
    # lambda_adv 0: nothing is scored, nothing is needed.
    c = _load(tmp_path, "objective: {algorithm: a_grpo, lambda_adv: 0}\ndata: {prompt_paths: [p.jsonl]}\n" + ROLLOUT)
    assert not c.data.require_teacher_response


@pytest.mark.parametrize(
    "text,match",
    [
        ("objective: {algorithm: grpo}\ndata: {prompt_paths: [p.jsonl]}\n", "no rollout section"),
        ("objective: {algorithm: grpo}\n" + ROLLOUT, r"data.prompt_paths is empty: give the prompt file"),
        (
            "objective: {algorithm: grpo}\ndata: {prompt_paths: [p.jsonl], prompts_per_step: 0}\n" + ROLLOUT,
            "prompts_per_step=0: set it >= 1, or use algorithm 'sft'",
        ),
        ("objective: {algorithm: sft}\n", r"data.demo_paths is empty: .*or set data.demos_per_step: 0"),
        (
            "objective: {algorithm: sft}\ndata: {demo_paths: [d.jsonl]}\nstage2: {lr: 1.0e-6}\n",
            "stage2 section applies to staged presets",
        ),
        (
            "objective: {algorithm: sft->grpo, stage_switch_step: 3}\ntrain: {minibatches: 2}\n",
            r"stage_switch_step=3 falls inside a step's 2 optimizer updates .* use a multiple of 2 \(e.g. 2 or 4\)",
        ),
        (
            "objective: {algorithm: sft->grpo, stage_switch_step: 10}\ntrain: {steps: 5}\n",
            r"stage_switch_step=10 is not before the run's last optimizer update \(5 updates",
        ),
    ],
)
def test_refused_with_how_to_fix(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, text)


def test_second_stage_section(tmp_path):
    c = _load(
        tmp_path,
        "objective: {algorithm: sft->grpo, stage_switch_step: 4}\ntrain: {steps: 6, ppo_epochs: 2}\n"
        "data: {demo_paths: [d.jsonl], prompt_paths: [p.jsonl]}\n"
        + ROLLOUT
        + "stage2: {lr: 1e-6, decay_style: cosine, reset_reference: false}\noptim: {lr: 1.0e-5}\n",
    )
    assert c.stage2.lr == 1e-6 and c.stage2.decay_style == "cosine" and c.stage2.reset_reference is False
    assert c.data.demos_per_step == 8 and c.data.prompts_per_step == 8  # both stages' data
    from uniapl_megatron.trainer.stages import StageSwitch

    s = StageSwitch(c)
    # The switch counts optimizer updates: update 4 = the start of step 2 at 2 updates per step.
    assert s.switch_step == 2 and s.first_schedule_updates() == 4
    second = s.second_optim()
    assert second.lr == 1e-6 and second.decay_style == "cosine" and second.min_lr == c.optim.min_lr
    with pytest.raises(ConfigError, match="stage2.decay_style"):
        _load(tmp_path, "objective: {algorithm: sft->grpo, stage_switch_step: 1}\nstage2: {decay_style: step}\n")


def test_cli_refuses_at_start_up(tmp_path):
    """`uniapl train` stops before any rank starts, with the message and exit status 2, not a traceback."""
    f = tmp_path / "c.yaml"
    f.write_text("model: {hf_path: m}\nobjective: {algorithm: a_grpo}\ndata: {prompt_paths: [p.jsonl]}\n" + ROLLOUT)
    p = subprocess.run(
        [sys.executable, "-m", "uniapl_megatron.cli", "train", str(f)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "error:" in p.stderr and "no discriminator section" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
