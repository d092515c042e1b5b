"""`.ci/run`, the CI entry point, on stand-ins for what it drives: a failing or answering Slurm start-up
script, `scontrol`, and `make test` running pytest on a two-test folder. (The real cluster and the real
suite run in CI itself; here only the script's own decisions are checked.) It must stop when the cluster
does not start, print pytest's passed and skipped counts, and fail when a test was skipped."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _sandbox(tmp_path: Path, slurm_up_ok: bool, skip_one: bool) -> tuple[Path, dict]:
    """A copy of the repository's .ci/run with stand-in neighbours, and the PATH that finds them."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    _exe(
        repo / ".ci" / "slurm_up.sh",
        "#!/usr/bin/env bash\n"
        + (
            f"echo 'export SLURM_CONF={tmp_path}/slurm.conf'\n"
            if slurm_up_ok
            else "echo '[slurm_up] error: munged did not start' >&2\nexit 1\n"
        ),
    )
    _exe(repo / ".ci" / "slurm_down.sh", f"#!/usr/bin/env bash\ntouch {tmp_path}/down\n")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    _exe(bin_dir / "scontrol", "#!/usr/bin/env bash\necho 'Slurmctld(primary) at node is UP'\n")
    # `make test PYTEST_ARGS=...`: pytest with those arguments, as the Makefile runs it.
    _exe(
        bin_dir / "make",
        '#!/usr/bin/env bash\nargs=\nfor a in "$@"; do case $a in PYTEST_ARGS=*) '
        "args=${a#PYTEST_ARGS=};; esac; done\n"
        "exec .venv/bin/python -m pytest -q -p no:cacheprovider $args tests\n",
    )
    (repo / "tests").mkdir()
    (repo / "tests" / "test_two.py").write_text(
        "import pytest\n\ndef test_one():\n    pass\n\n"
        + ("@pytest.mark.skip(reason='a stand-in skip')\n" if skip_one else "")
        + "def test_two():\n    pass\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("SLURM_CONF", None)
    return repo, env


def _run(repo: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / ".ci" / "run")], cwd=repo, env=env, check=False, capture_output=True, text=True, timeout=300
    )


def test_stops_when_the_cluster_does_not_start(tmp_path):
    repo, env = _sandbox(tmp_path, slurm_up_ok=False, skip_one=False)
    p = _run(repo, env)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "the local Slurm cluster did not start" in p.stderr and "pytest:" not in p.stdout


@pytest.mark.parametrize("skip_one", [False, True])
def test_prints_pytest_counts_and_fails_on_a_skip(tmp_path, skip_one):
    repo, env = _sandbox(tmp_path, slurm_up_ok=True, skip_one=skip_one)
    p = _run(repo, env)
    last = p.stdout.strip().splitlines()[-1]
    if skip_one:
        assert p.returncode == 1 and last == "pytest: 1 passed, 0 failed, 0 errors, 1 skipped", (p.stdout, p.stderr)
        assert "tests were skipped" in p.stderr
    else:
        assert p.returncode == 0 and last == "pytest: 2 passed, 0 failed, 0 errors, 0 skipped", (p.stdout, p.stderr)
    assert (tmp_path / "down").exists()  # the cluster is stopped on the way out


def test_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    r = subprocess.run(
        [str(shellcheck if shellcheck.exists() else "shellcheck"), str(ROOT / ".ci" / "run")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
