"""The run's configuration: one YAML file, one dataclass per section, `section.key=value` overrides.

Each section's fields (with what they do) live next to the code that uses them: `model` (ModelConfig),
`parallel` (ParallelConfig), `data` (DataConfig), `rollout` (RolloutConfig), `sampling` (SamplingConfig),
`objective` (ObjectiveConfig), `discriminator` (DiscriminatorConfig), `reward`, `optim` (OptimConfig) and
`train` (TrainConfig below). Nothing is duplicated between YAML and code: the YAML only sets fields.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from ..config_fields import Ge, check_fields, coerce_yaml
from ..data.config import DataConfig
from ..data.packing import required_pad_multiple
from ..discriminator.config import DiscriminatorConfig
from ..models.arch import ConfigError
from ..models.qwen3 import ModelConfig
from ..objective.config import ObjectiveConfig
from ..parallel import ParallelConfig
from ..rollout.config import RolloutConfig
from .optim import OptimConfig

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    group_size: int = 4
    """G: samples per RL prompt (the GRPO group)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = off."""
    max_new_tokens: int = 128
    """Longest rollout response, in tokens."""

    def __post_init__(self) -> None:
        check_fields(self, "sampling", ConfigError)


@dataclass
class RewardSection:
    name: str = "ifeval"
    """Registered reward (uniapl_megatron.rewards): ifeval = all instruction constraints hold (1/0)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The reward's own config fields (e.g. {mode: loose, aggregate: fraction})."""
    timeout_s: float = 10.0
    """Per-sample time limit of a check: each sample is scored in a pool of worker processes; one that
    takes longer is killed (its worker replaced), scores 0, and is counted (reward/timeouts) and logged
    with its prompt and response. 0 = score in this process, without a limit."""
    workers: int = 2
    """Worker processes of that pool (kept warm across steps)."""

    def __post_init__(self) -> None:
        check_fields(self, "reward", ConfigError)


@dataclass
class TrainConfig:
    steps: int = 100
    """Steps of the run. Each step draws one batch (rollouts and demos) and makes ppo_epochs x minibatches
    optimizer updates on it; objective.stage_switch_step and the LR schedule count those updates."""
    ppo_epochs: int = 1
    """Passes over each step's sequences."""
    minibatches: int = 1
    """Optimizer updates per pass (the step's sequences split evenly); >1 makes later updates off-policy.
    The step's logged metrics are means over its updates (grad_norm too, as verl logs it; grad_norm/max is
    the largest), lr is the last update's and skipped counts the skipped updates."""
    seed: int = 1234
    """Seed of the student's initialisation noise, dropout and rollout sampling."""
    output_dir: str = "runs/uniapl"
    """Checkpoints, metrics.jsonl, TensorBoard events and plots go here."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from output_dir's latest checkpoint if there is one; never: start fresh."""
    save_every: int = 50
    """Checkpoint every this many steps (and at the end, and on SIGTERM / SIGUSR1)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted after a new one is complete)."""
    max_nonfinite_in_row: int = 3
    """Steps with a NaN/inf loss or gradient norm are skipped and counted; this many in a row stop the run."""
    tensorboard: bool = True
    """Write TensorBoard events of the logged metrics."""
    wandb_project: str | None = None
    """Log to Weights & Biases too (when wandb is installed)."""
    log_samples: int = 2
    """Rollouts per step written to samples.jsonl (prompt, response, reward) to read what the policy does."""
    log_rollouts: bool = False
    """Write every rollout sample to rollouts.jsonl: one line each with step, prompt_index (its position in the
    step's prompts, across all engines; what its seed derives from), sample_index, dataset_index, token_ids and
    reward. Written by rank 0 from the gathered results."""
    plot: bool = True
    """Write plot.png of reward and losses per step at the end."""
    eval_every: Annotated[int, Ge(0)] = 0
    """Held-out evaluation (data.eval_prompt_paths) every this many steps too; 0: only before the first and
    after the last step."""
    eval_samples: Annotated[int, Ge(1)] = 4
    """Samples per held-out prompt (at sampling.temperature, seeded by train.seed: the same draws at every
    evaluation, so two evaluations differ only by the weights)."""
    # ---- run health and checkpoints at scale (trainer/health.py, trainer/checkpoint.py) ----
    hang_timeout_s: float = 1200.0
    """When no rank has advanced (changed phase) for this long, every live rank dumps its Python stack to
    <output_dir>/health/, the lowest live one writes health/hang_report.json naming the ranks that did not
    arrive, and all exit with code 75 so Slurm requeues the job. 0 = off. Must stay below the process
    group's 30-minute timeout, or a hung collective raises first, without forensics."""
    async_save: bool = True
    """Checkpoints are written by a background process while training goes on; `latest` moves once every
    rank's writer has finished. false = the save blocks until written."""
    fully_parallel_save: bool = True
    """Spread the writing (and reading) of replicated shards over the data-parallel ranks (Megatron's
    FullyParallelSave/LoadStrategyWrapper)."""
    ckpt_optim_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    """Distributed-optimizer state format. fully_reshardable: resumes at any TP / PP / DP (saving gathers
    each DP group's optimizer shards). dp_reshardable: no gather, but resumes only at the same TP / PP."""
    job_end_time: str = "auto"
    """When the job will be stopped, so the last save starts in time: auto = Slurm's end time for
    SLURM_JOB_ID (SLURM_JOB_END_TIME, else squeue), none where there is no job; "none" = no deadline;
    or Unix seconds, or a local ISO time such as 2026-11-03T17:00:00."""
    save_margin_s: Annotated[float, Ge(0)] = 120.0
    """Slack on top of the expected step and save time: a save starts (and the run stops for a requeue)
    once the job end is nearer than the longest recent step + the last save's duration + this."""

    preflight_tolerance: Annotated[float, Ge(0)] | None = None
    """Pre-flight log-prob gate (trainer/preflight.py): after the first weight sync (start and resume), the
    engines sample preflight_prompts prompts and the trainer scores the same tokens at sampling.temperature;
    the run refuses to start when max |diff| exceeds this, naming the likely cause (temperature, raw vs
    processed log-probs, weights/dtype). None: 1e-3 with float32 engine and student, 0.5 otherwise; 0: off.
    The gate samples without top-k/top-p (the trainer's log-probs are of the full distribution)."""
    preflight_prompts: Annotated[int, Ge(1)] = 2
    """Prompts the pre-flight gate samples (sampling.group_size samples each, at most 16 new tokens)."""

    def __post_init__(self) -> None:
        if isinstance(self.job_end_time, (int, float)) and not isinstance(self.job_end_time, bool):
            self.job_end_time = f"{self.job_end_time:.0f}"  # YAML reads Unix seconds as a number
        check_fields(self, "train", ConfigError)
        from .checkpoint import parse_end_time
        from .health import PG_TIMEOUT_S

        if not 0 <= self.hang_timeout_s < PG_TIMEOUT_S:
            raise ConfigError(
                f"train.hang_timeout_s={self.hang_timeout_s}: expected 0 (off) or a value below "
                f"{PG_TIMEOUT_S:.0f} s, the process group's timeout (a hung collective raises then)"
            )
        if self.job_end_time not in ("auto", "none"):
            parse_end_time(self.job_end_time, "train.job_end_time")


@dataclass
class SecondStageConfig:
    """The second stage of a staged preset (objective.algorithm ``x->y``), from optimizer update
    objective.stage_switch_step on. The first stage runs `optim`'s learning rate and schedule over its own
    updates; at the switch the second stage starts like a fresh run from the first stage's weights: its own
    schedule over the remaining updates, fresh Adam moments, and (reset_reference) a new KL reference."""

    lr: Annotated[float, Ge(0)] | None = None
    """Peak learning rate of the second stage; None: optim.lr."""
    min_lr: Annotated[float, Ge(0)] | None = None
    """Learning rate at the end of the second stage's decay; None: optim.min_lr."""
    warmup_steps: Annotated[int, Ge(0)] | None = None
    """Linear warm-up, in optimizer updates from the switch; None: optim.warmup_steps."""
    decay_style: Literal["constant", "linear", "cosine"] | None = None
    """Decay over the second stage's updates; None: optim.decay_style."""
    reset_reference: bool = True
    """The KL reference model (objective.kl_coef > 0) becomes a copy of the student at the switch, as when
    RL starts from the SFT checkpoint; saved once under <output_dir>/checkpoints/reference so a resumed run
    gets it back. False: the reference stays the initial model."""

    def __post_init__(self) -> None:
        check_fields(self, "stage2", ConfigError)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "sampling": SamplingConfig,
    "objective": ObjectiveConfig,
    "discriminator": DiscriminatorConfig,
    "reward": RewardSection,
    "optim": OptimConfig,
    "train": TrainConfig,
    "stage2": SecondStageConfig,
}
"""Section name -> its dataclass, in the order they are built."""


@dataclass
class RunConfig:
    model: ModelConfig
    """The student: its Hugging Face folder, dtype, FP8, recompute."""
    parallel: ParallelConfig
    """The Megatron layout: TP, SP, PP, VPP, EP, CP, distributed optimizer."""
    data: DataConfig
    """Demonstration and prompt files, their checks, the step's mix and packing."""
    rollout: RolloutConfig | None
    """The rollout engine; None when no stage samples."""
    sampling: SamplingConfig
    """How rollouts are drawn."""
    objective: ObjectiveConfig
    """The preset and the shape of its loss terms."""
    discriminator: DiscriminatorConfig | None
    """The adversarial term's discriminator; None when no stage scores rollouts."""
    reward: RewardSection
    """The verifiable task reward."""
    optim: OptimConfig
    """Optimizer and learning-rate schedule (of the first stage, for a staged preset)."""
    train: TrainConfig
    """Steps, updates per step, checkpoints and logging."""
    stage2: SecondStageConfig | None = None
    """A staged preset's second stage; None: it continues with `optim`."""
    source: str = ""
    """The config file it was read from."""

    def __post_init__(self) -> None:
        # Each sequence's padding follows from the layout; data.pad_multiple is raised to a multiple of what it
        # needs, so every reader of it (the trainer's packing, the saved config) sees it. The FP8 recipe's
        # multiple applies to the packed row, not each sequence (data.packing.row_pad_multiple).
        need = required_pad_multiple(
            self.parallel.tensor_model_parallel_size,
            self.parallel.context_parallel_size,
            self.parallel.sequence_parallel,
        )
        have = self.data.pad_multiple
        if have % need:
            self.data.pad_multiple = math.lcm(have, need)
            log.info(
                "data.pad_multiple %d -> %d (TP %d%s, CP %d)",
                have,
                self.data.pad_multiple,
                self.parallel.tensor_model_parallel_size,
                " with SP" if self.parallel.sequence_parallel else "",
                self.parallel.context_parallel_size,
            )

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def _build(section: str, cls: type, values: Any, source: str) -> Any:
    """One section from its YAML mapping. Every field is checked against its type hint (config_fields): by the
    section's own __post_init__, or here for the sections defined next to their code (model, parallel,
    optim); errors name the file and ``section.field``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} should be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"{section} has: {', '.join(sorted(names))}"
        )
    coerce_yaml(cls, values)
    try:
        built = cls(**values)
        check_fields(built, section, ConfigError)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return built


def load_config(path: str | Path | None, overrides: list[str] = (), base_dir: str | Path | None = None) -> RunConfig:
    """YAML file + ``section.key=value`` overrides (values parsed as YAML) -> validated RunConfig.

    Relative paths in the file are resolved against the file's folder.
    """
    tree: dict[str, Any] = {}
    source = str(path) if path else "<overrides>"
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level should be a mapping of sections")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected section.key=value")
        k, v = o.split("=", 1)
        _set_path(tree, k.strip(), yaml.safe_load(v))
    sections = SECTIONS
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; expected: {', '.join(sorted(sections))}")
    base = Path(base_dir or (Path(path).parent if path else "."))
    _resolve_paths(tree, base)
    built = {}
    for name, cls in sections.items():
        if name in ("rollout", "discriminator", "stage2") and not tree.get(name):
            built[name] = None
            continue
        if name == "rollout":
            tree[name].setdefault("model_path", (tree.get("model") or {}).get("hf_path", ""))
        built[name] = _build(name, cls, dict(tree.get(name) or {}), source)
    cfg = RunConfig(**built, source=source)
    check_run(cfg, explicit={f"{sec}.{k}" for sec, keys in tree.items() if isinstance(keys, dict) for k in keys})
    return cfg


_PATH_KEYS = {
    ("model", "hf_path"),
    ("model", "load"),
    ("data", "tokenizer_path"),
    ("rollout", "model_path"),
    ("discriminator", "path"),
    ("train", "output_dir"),
}
_PATH_LIST_KEYS = {("data", "demo_paths"), ("data", "prompt_paths"), ("data", "eval_prompt_paths")}


def _resolve_paths(tree: dict, base: Path) -> None:
    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not Path(p).is_absolute() and not p.startswith("@"):
            return str((base / p).resolve())
        return p

    for sec, key in _PATH_KEYS:
        if isinstance(tree.get(sec), dict) and key in tree[sec]:
            tree[sec][key] = fix(tree[sec][key])
    for sec, key in _PATH_LIST_KEYS:
        if isinstance(tree.get(sec), dict) and isinstance(tree[sec].get(key), list):
            tree[sec][key] = [fix(p) for p in tree[sec][key]]


def updates_per_step(cfg: RunConfig) -> int:
    """Optimizer updates one step makes."""
    return cfg.train.ppo_epochs * cfg.train.minibatches


def check_run(cfg: RunConfig, explicit: set[str] = frozenset()) -> None:
    """What the preset implies for the other sections, and the combinations it cannot run, refused with how
    to fix them. ``explicit``: the ``section.key`` names the user set (a default may be implied away, a value
    the user chose is refused instead). Sets data.prompts_per_step / demos_per_step to 0 when no stage
    draws them (and drops the rollout section when no stage samples, the discriminator when none scores),
    and data.require_teacher_response when a stage scores rollouts with the discriminator."""
    from ..objective import run_needs

    obj, data, algo = cfg.objective, cfg.data, f"objective.algorithm={cfg.objective.algorithm!r}"
    u = updates_per_step(cfg)
    total = cfg.train.steps * u
    if "->" in obj.algorithm:
        _check_switch(cfg, u, total)
    elif cfg.stage2 is not None:
        raise ConfigError(
            f"the stage2 section applies to staged presets (x->y) only; {algo} has one stage: "
            "remove the section or pick a staged algorithm"
        )
    needs = run_needs(obj, total)
    if not needs.rollouts:
        data.prompts_per_step = 0  # e.g. sft: no RL prompts are drawn, so none need to exist
        if not data.eval_prompt_paths:
            cfg.rollout = None  # and no engine is started (the held-out evaluation samples through it)
    if not needs.demos:
        data.demos_per_step = 0
    if not needs.discriminator:
        cfg.discriminator = None  # nothing is scored, and an online one is not trained on missing references
    if needs.discriminator:
        _check_discriminator(cfg, explicit, algo)
    if needs.rollouts:
        if data.prompts_per_step == 0:
            raise ConfigError(
                f"{algo} trains on rollouts but data.prompts_per_step=0: set it >= 1, or use "
                "algorithm 'sft' for demonstrations only"
            )
        if not data.prompt_paths:
            raise ConfigError(
                f"{algo} trains on rollouts of RL prompts, but data.prompt_paths is empty: give the prompt file(s)"
            )
        if cfg.rollout is None:
            raise ConfigError(
                f"{algo} trains on rollouts, but the config has no rollout section: add one "
                "(e.g. rollout: {engine: vllm})"
            )
    if needs.demos and data.demos_per_step > 0 and not data.demo_paths:
        raise ConfigError(
            f"{algo} trains on teacher demonstrations, but data.demo_paths is empty: give the "
            "demonstration file(s), or set data.demos_per_step: 0 to train without the SFT term"
        )
    if data.prompts_per_step == 0 and data.demos_per_step == 0:
        raise ConfigError(f"{algo}: data.demos_per_step=0 and no rollouts: a step would train on nothing")


def _check_switch(cfg: RunConfig, u: int, total: int) -> None:
    s = cfg.objective.stage_switch_step
    if s % u:
        raise ConfigError(
            f"objective.stage_switch_step={s} falls inside a step's {u} optimizer updates (train.ppo_epochs="
            f"{cfg.train.ppo_epochs} x train.minibatches={cfg.train.minibatches}): use a multiple of {u} "
            f"(e.g. {max(u, s // u * u)} or {(s // u + 1) * u})"
        )
    if s >= total:
        raise ConfigError(
            f"objective.stage_switch_step={s} is not before the run's last optimizer update ({total} updates: "
            f"train.steps={cfg.train.steps} x {u}), so the second stage of {cfg.objective.algorithm!r} would "
            "never run: lower the switch or raise train.steps"
        )


def _check_discriminator(cfg: RunConfig, explicit: set[str], algo: str) -> None:
    obj = cfg.objective
    if cfg.discriminator is None:
        raise ConfigError(
            f"{algo} scores rollouts with a discriminator (lambda_adv={obj.lambda_adv}, adversarial_mode="
            f"{obj.adversarial_mode!r}) but the config has no discriminator section: add one (kind: frozen or "
            "online, path: the model folder), or set objective.lambda_adv: 0"
        )
    if not cfg.data.require_teacher_response and "data.require_teacher_response" in explicit:
        raise ConfigError(
            f"data.require_teacher_response=false, but {algo} compares each rollout with the teacher's answer "
            "(the discriminator's reference): remove the setting, so every RL prompt must carry a "
            "'teacher_response'"
        )
    cfg.data.require_teacher_response = True
