"""The sweep file: a grid of presets x students x seeds over one base config, and the cells it expands to.

    name: mini_repro
    base: tiny_cpu.yaml                 # a `uniapl train` config (relative paths: to this file's folder)
    output_dir: ../results/mini_repro
    overrides: [train.steps=40]         # every cell
    students:
      tiny:
        overrides: [model.hf_path=...]  # this student's cells
        warmup: [objective.algorithm=sft, train.steps=12]   # optional: trained once, exported; cells start there
    presets:                            # objective.algorithm of each cell, with its own overrides
      grpo: []
      sft->grpo: [objective.stage_switch_step=20]
    seeds: [1, 2, 3]
    seed_overrides: ["train.seed={seed}", "data.seed={seed}"]
    cells:                              # overrides for cells whose id matches (fnmatch on student/preset/seed)
      "tiny/uniapl/*": [objective.lambda_adv=0.05]
    evaluators: {heldout: {}}           # registered evaluators (sweep/evaluators.py) and their options
    slurm: {train_args: [--time=04:00:00], eval_args: [--gpus-per-node=1]}

A cell's overrides, later ones winning: the sweep's, the student's, (the warm-up's export as model.hf_path),
the preset's (objective.algorithm first), the seed's, the matching `cells` entries; the sweep sets
train.output_dir itself. Every cell's config is loaded and checked before anything runs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from ..config_fields import MinLen, check_fields

ROOT = Path(__file__).resolve().parents[2]


class SweepError(ValueError):
    """A sweep file that cannot run; the message names the file and the field."""


@dataclass
class StudentSpec:
    base: str | None = None
    """This student's own base config (relative to the sweep file), e.g. its size's recipe; None: the sweep's."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of every cell of this student (e.g. model.hf_path, parallel sizes)."""
    warmup: list[str] | None = None
    """Overrides of a warm-up run trained once for this student (on top of the sweep's and the student's), e.g. a
    short SFT that gives a tiny model the partial skill a real student starts with. Its final checkpoint,
    exported to Hugging Face format, is model.hf_path of every cell of the student. None: no warm-up."""


@dataclass
class SlurmSpec:
    train_script: str = "slurm/uniapl_1node.sh"
    """The training job's batch script (relative to the repository), one that sources slurm/_launch.sh."""
    train_args: list[str] = field(default_factory=list)
    """sbatch options of every training job (partition, account, time, nodes, ...)."""
    eval_args: list[str] = field(default_factory=list)
    """sbatch options of every evaluation job (export + evaluators), chained to its training job."""


Text = Annotated[str, MinLen(1), "a non-empty string"]


@dataclass
class SweepSpec:
    name: Text
    """Names the sweep in its progress output and result records."""
    base: Text
    """The `uniapl train` config every cell starts from (resolved against the sweep file's folder)."""
    output_dir: Text
    """Results, table and curves go here (results/, table.md, table.csv, curves/); the cells' runs in cells/."""
    presets: dict[str, list[str]]
    """objective.algorithm of each column of cells -> its own overrides (a list of names: no overrides)."""
    students: dict[str, StudentSpec]
    """Student name (as the table shows it) -> its overrides and optional warm-up."""
    seeds: list[int] = field(default_factory=lambda: [1])
    """One cell per seed; the table reports mean and standard deviation over them."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of every cell (and of the warm-ups)."""
    seed_overrides: list[str] = field(default_factory=lambda: ["train.seed={seed}"])
    """Overrides that make a seed; `{seed}` is replaced."""
    cells: dict[str, list[str]] = field(default_factory=dict)
    """fnmatch pattern on 'student/preset/seed' -> overrides of the matching cells."""
    evaluators: dict[str, dict[str, Any]] = field(default_factory=lambda: {"heldout": {}})
    """Registered evaluator name -> its options (sweep/evaluators.py); each adds one benchmark column."""
    keep_checkpoints: bool = False
    """Keep each finished cell's training checkpoints and exported model (off: deleted once its result is
    written; a warm-up's export is always kept)."""
    runner: Literal["local", "slurm"] = "local"
    """Default runner: one cell after another here, or one Slurm job per cell (--runner overrides it)."""
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    """How the Slurm runner submits its jobs."""
    source: str = ""
    """The sweep file it was read from."""


@dataclass
class Cell:
    """One run of the grid (or a student's warm-up)."""

    id: str
    """Folder-safe name: student__preset__sSEED, or student__warmup."""
    student: str
    """The student's name in the sweep file."""
    preset: str
    """objective.algorithm; "warmup" for a warm-up."""
    seed: int | None
    """The seed; None for a warm-up."""
    overrides: list[str]
    """The cell's overrides, in the order they apply."""
    warmup_of: str | None = None
    """The warm-up cell this one starts from."""
    base: Path = ROOT
    """The `uniapl train` config it starts from."""

    @property
    def label(self) -> str:
        return f"{self.student}/{self.preset}" + ("" if self.seed is None else f"/seed{self.seed}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("->", "-to-")).strip("_")


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{where}: expected a list of section.key=value strings, got {value!r}")
    for v in value:
        if "=" not in v or v.split("=", 1)[0].strip().startswith("train.output_dir"):
            raise SweepError(
                f"{where}: {v!r} is not section.key=value"
                if "=" not in v
                else f"{where}: train.output_dir is set by the sweep (output_dir/cells/<cell>/run)"
            )
    return list(value)


def _section(cls: type, values: Any, where: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise SweepError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"source"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; expected: {', '.join(sorted(names))}")
    return dict(values)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every message names the file and the field."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SweepError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({e})") from None
    src = str(path)
    top = _section(SweepSpec, tree if tree is not None else {}, src)
    for key in ("name", "base", "output_dir", "presets", "students"):
        if key not in top:
            raise SweepError(f"{src}: missing {key!r}")
    from ..objective.config import ALGORITHMS

    presets = top["presets"]
    if isinstance(presets, list):
        presets = {p: [] for p in presets}
    if not isinstance(presets, dict) or not presets:
        raise SweepError(f"{src}: presets: expected a list of preset names or a mapping name -> overrides")
    for p in presets:
        if p not in ALGORITHMS:
            raise SweepError(f"{src}: presets: unknown preset {p!r}; known: {', '.join(ALGORITHMS)}")
    students, cells = top["students"], top.get("cells") or {}
    if not isinstance(students, dict) or not students:
        raise SweepError(f"{src}: students: expected a mapping name -> {{overrides, warmup}}")
    if not isinstance(cells, dict):
        raise SweepError(f"{src}: cells: expected a mapping 'student/preset/seed' pattern -> overrides")
    slurm = _checked(SlurmSpec(**_section(SlurmSpec, top.get("slurm") or {}, f"{src}: slurm")), "slurm", src)
    spec = SweepSpec(
        name=top["name"],
        base=top["base"],
        output_dir=top["output_dir"],
        source=src,
        presets={p: _strings(v, f"{src}: presets.{p}") for p, v in presets.items()},
        students={s: _student(v, f"{src}: students.{s}") for s, v in students.items()},
        overrides=_strings(top.get("overrides"), f"{src}: overrides"),
        seed_overrides=_strings(top.get("seed_overrides", ["train.seed={seed}"]), f"{src}: seed_overrides"),
        cells={k: _strings(v, f"{src}: cells.{k}") for k, v in cells.items()},
        evaluators=_evaluators(top.get("evaluators", {"heldout": {}}), f"{src}: evaluators"),
        keep_checkpoints=top.get("keep_checkpoints", False),
        runner=top.get("runner", "local"),
        slurm=slurm,
    )
    seeds = top.get("seeds", [1])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise SweepError(f"{src}: seeds: expected a list of distinct integers, got {seeds!r}")
    spec.seeds = seeds
    return _checked(spec, "", src)


def _checked(section: Any, name: str, src: str) -> Any:
    """The section, its fields checked against their type hints (config_fields); SweepError naming the file."""
    try:
        check_fields(section, name, SweepError)
    except SweepError as e:
        raise SweepError(f"{src}: {e}") from None
    return section


def _student(value: Any, where: str) -> StudentSpec:
    value = _section(StudentSpec, value or {}, where)
    warm, base = value.get("warmup"), value.get("base")
    if base is not None and (not isinstance(base, str) or not base):
        raise SweepError(f"{where}.base: expected a config file path, got {base!r}")
    return StudentSpec(
        base,
        _strings(value.get("overrides"), f"{where}.overrides"),
        None if warm is None else _strings(warm, f"{where}.warmup"),
    )


def _evaluators(value: Any, where: str) -> dict[str, dict[str, Any]]:
    from .evaluators import EVALUATORS

    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = {v: {} for v in value}
    if not isinstance(value, dict) or not value:
        raise SweepError(f"{where}: expected at least one evaluator (mapping name -> options)")
    for name, opts in value.items():
        if name not in EVALUATORS:
            raise SweepError(f"{where}: unknown evaluator {name!r}; registered: {', '.join(sorted(EVALUATORS))}")
        if opts is not None and not isinstance(opts, dict):
            raise SweepError(f"{where}.{name}: options must be a mapping, got {opts!r}")
    return {k: dict(v or {}) for k, v in value.items()}


# ---- cells ----------------------------------------------------------------------------------------------


def output_path(spec: SweepSpec) -> Path:
    return (Path(spec.source).parent / spec.output_dir).resolve()


def cell_dir(out: Path, cell_id: str) -> Path:
    return out / "cells" / cell_id


def expand(spec: SweepSpec, out: Path) -> list[Cell]:
    """Warm-ups first, then students x presets x seeds in the file's order."""
    cells: list[Cell] = []
    for student, st in spec.students.items():
        warm, base = None, base_config(spec, st.base)
        if st.warmup is not None:
            warm = Cell(
                f"{_slug(student)}__warmup",
                student,
                "warmup",
                None,
                [*spec.overrides, *st.overrides, *st.warmup],
                base=base,
            )
            cells.append(warm)
        for preset, p_over in spec.presets.items():
            for seed in spec.seeds:
                ov = [*spec.overrides, *st.overrides]
                if warm is not None:
                    ov.append(f"model.hf_path={cell_dir(out, warm.id) / 'hf'}")
                ov += [
                    f"objective.algorithm={preset}",
                    *p_over,
                    *[o.replace("{seed}", str(seed)) for o in spec.seed_overrides],
                ]
                name = f"{student}/{preset}/{seed}"
                for pattern, extra in spec.cells.items():
                    if fnmatch.fnmatchcase(name, pattern):
                        ov += extra
                cells.append(
                    Cell(
                        f"{_slug(student)}__{_slug(preset)}__s{seed}",
                        student,
                        preset,
                        seed,
                        ov,
                        warm.id if warm else None,
                        base,
                    )
                )
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise SweepError(
            f"{spec.source}: two cells share a folder name ({sorted({i for i in ids if ids.count(i) > 1})})"
            "; give the students distinct names"
        )
    return cells


def run_overrides(cell: Cell, out: Path) -> list[str]:
    """The cell's overrides as `uniapl train` gets them: the sweep's last, its output folder."""
    return [*cell.overrides, f"train.output_dir={cell_dir(out, cell.id) / 'run'}"]


def cell_config(spec: SweepSpec, cell: Cell, out: Path) -> Any:
    """The cell's RunConfig (what its training run will load); SweepError naming the cell when it is invalid."""
    from ..models.arch import ConfigError
    from ..trainer.config import load_config

    try:
        return load_config(cell.base, run_overrides(cell, out))
    except (ConfigError, ValueError) as e:
        raise SweepError(f"{spec.source}: cell {cell.label}: {e}") from None


def base_config(spec: SweepSpec, path: str | None = None) -> Path:
    """A base config path of the sweep file (the sweep's own by default), resolved against its folder."""
    return (Path(spec.source).parent / (path or spec.base)).resolve()


def config_hash(cfg: Any, out: Path) -> str:
    """sha256 (16 hex digits) of the resolved config, without the cell's own folder and with the sweep and
    repository folders written as placeholders, so the same cell hashes the same in another checkout."""
    tree = cfg.to_dict()
    tree.pop("source", None)
    tree["train"] = {k: v for k, v in tree["train"].items() if k != "output_dir"}
    text = json.dumps(tree, sort_keys=True, default=str)
    text = text.replace(str(out.resolve()), "$SWEEP").replace(str(ROOT), "$ROOT")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit() -> str:
    """HEAD of the repository the code runs from, '+dirty' with uncommitted changes; 'unknown' without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
