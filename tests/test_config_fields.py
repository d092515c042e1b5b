"""Config sections as declared (config_fields.py): every field checked from its type hint with a message naming
the dotted field, what it expects and the value; a docstring under every field; every example config loads."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest
import yaml

from uniapl_megatron.models.arch import ConfigError
from uniapl_megatron.trainer.config import SECTIONS, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"
CONFIG_MODULES = [
    "config_fields.py",
    "trainer/config.py",
    "data/config.py",
    "rollout/config.py",
    "objective/config.py",
    "discriminator/config.py",
    "generate_config.py",
    "sweep/spec.py",
]


@pytest.mark.parametrize(
    "override, message",
    [
        # a Literal: the field, every choice and the value
        ("rollout.engine=vlm", "rollout.engine: expected one of 'vllm', 'torch', got 'vlm'"),
        ("model.recompute=some", "model.recompute: expected one of 'none', 'selective', 'full', got 'some'"),
        ("stage2.decay_style=step", "stage2.decay_style: expected one of 'constant', 'linear', 'cosine' or null, got"),
        # a wrong type: a string where an integer (with its bound) is expected, a number where true/false is
        ("data.max_prompt_tokens=many", "data.max_prompt_tokens: expected an integer >= 1, got 'many'"),
        ("train.steps=2.5", "train.steps: expected an integer, got 2.5"),
        ("parallel.sequence_parallel=1", "parallel.sequence_parallel: expected true or false, got 1"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("data.demo_paths=[3]", "data.demo_paths: expected a list of file paths, got [3]"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_what_it_expects(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(f"{TINY}: ") and message in str(e.value), e.value


def test_sections_built_in_code_are_checked_too_and_yaml_numbers_are_read():
    with pytest.raises(ConfigError, match=r"^train.steps: expected an integer, got '3'$"):
        TrainConfig(steps="3")
    cfg = load_config(TINY, ["optim.lr=1e-4", "optim.min_lr=0", "train.steps='7'"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.min_lr, float) and cfg.train.steps == 7


def _undocumented(cls_node: ast.ClassDef) -> list[str]:
    body = cls_node.body
    missing = []
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            after = body[i + 1] if i + 1 < len(body) else None
            if not (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                missing.append(f"{cls_node.name}.{node.target.id}")
    return missing


def _is_dataclass(node: ast.ClassDef) -> bool:
    return any("dataclass" in ast.unparse(d) for d in node.decorator_list)


def test_every_config_field_has_a_docstring():
    """A string statement right under each field of every dataclass in the config modules, and of every section
    (model, parallel and optim live next to their code)."""
    classes = []
    for rel in CONFIG_MODULES:
        tree = ast.parse((ROOT / "uniapl_megatron" / rel).read_text())
        classes += [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and _is_dataclass(n)]
    for cls in SECTIONS.values():
        classes.append(ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0])
    assert len(classes) >= 20
    missing = [name for c in classes for name in _undocumented(c)]
    assert not missing, f"fields without a docstring under them: {', '.join(missing)}"


def test_every_example_config_loads():
    from uniapl_megatron.generate_config import load_generate_config
    from uniapl_megatron.sweep.spec import load_spec

    kinds = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        top = set(yaml.safe_load(path.read_text()))
        if top <= {"generate", "teacher"}:
            assert load_generate_config(str(path), []).generate.input_paths
            kinds.append("generate")
        elif {"presets", "students"} <= top:
            assert load_spec(path).presets
            kinds.append("sweep")
        else:
            cfg = load_config(path)
            assert all(dataclasses.is_dataclass(getattr(cfg, name)) for name in ("model", "data", "objective"))
            kinds.append("run")
    assert kinds.count("run") >= 4 and "generate" in kinds and "sweep" in kinds, kinds
