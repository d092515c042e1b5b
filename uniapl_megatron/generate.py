"""`uniapl generate CONFIG.yaml`: the teacher's answers to a prompt set, through the vLLM rollout engine.

The output is the JSONL the trainer reads, as demonstrations and as RL prompts (data/schema.py): the
input row's prompt / messages, key, instruction_id_list and kwargs, plus ``teacher_response``, and per
row ``teacher`` (the model's name) and ``sampling`` (the settings that drew it).

Layout: ``generate.data_parallel_size`` engines of ``teacher.tensor_parallel_size`` ranks each (one
engine per TP group, vLLM's external launcher; world size = DP x TP). Prompts go in chunks of
``chunk_size`` consecutive rows, chunk c to engine c % DP; a prompt's sample is seeded by its global
index (SamplingParams.prompt_index_offset), so the output does not depend on the number of engines.

Resuming and atomic writes: each finished chunk is written aside, fsync'd and renamed into
``<output>.parts/chunk-NNNNNN.jsonl`` by the first rank of its engine, so a chunk file is either
complete or absent. A rerun (same settings: checked against ``manifest.json``) skips the chunks
present, at any DP. When every chunk is there, rank 0 merges them in order into the output (written
aside, fsync'd, renamed) and writes ``<output>.summary.json``. SIGUSR1 (the Slurm time limit) stops
each rank after its current chunk; the requeued job resumes.

Dropped, and counted in the summary: prompts that match an evaluation prompt (IFEval, IFBench;
``decontaminate``), prompts too long for max_model_len, answers cut at max_new_tokens
(``drop_truncated``) and answers that fail their own prompt's constraints (``filter_constraints``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any, Iterator

from uniapl_megatron.generate_config import (  # noqa: F401  (GenerateConfig: re-exported)
    GenerateConfig,
    GenerateError,
    GenerateRun,
    fingerprint,
    load_generate_config,
    read_prompts,
)

log = logging.getLogger(__name__)
DROP_REASONS = ("contaminated", "too_long", "truncated", "failed_constraints")


# --- atomic files --------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_lines(path: Path, lines: Iterator[str]) -> None:
    """Complete lines, written aside, fsync'd, renamed into place (then the folder fsync'd)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def chunk_file(parts: Path, c: int) -> Path:
    return parts / f"chunk-{c:06d}.jsonl"


# --- one chunk -----------------------------------------------------------------------------------------


def _prompt_text(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


class ChunkWorker:
    """Generates, checks and records the teacher's answers for one chunk of prompts."""

    def __init__(self, run: GenerateRun, prompts: list[dict[str, Any]], engine: Any, fmt: Any):
        from uniapl_megatron.rewards import build_reward

        self.cfg = run.generate
        self.max_model_len = run.teacher.max_model_len
        self.prompts = prompts
        self.engine = engine
        self.fmt = fmt
        self.teacher = self.cfg.teacher_name or Path(run.teacher.model_path).name
        self.reward = build_reward("ifeval") if self.cfg.filter_constraints else None  # IFEval + IFBench checkers
        self.deco = None
        if self.cfg.decontaminate:
            from uniapl_megatron.rewards.prompts import eval_decontaminator

            self.deco = eval_decontaminator()

    def _contaminated(self, p: dict[str, Any]) -> bool:
        from uniapl_megatron.rewards.prompts import describe

        row = p["row"]
        templates = describe(row["instruction_id_list"], row["kwargs"]) if row.get("instruction_id_list") else []
        return self.deco.reason(_prompt_text(p["messages"]), templates) is not None

    def _params(self, offset: int) -> Any:
        from uniapl_megatron.rollout import SamplingParams

        c = self.cfg
        return SamplingParams(
            n=1,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_new_tokens=c.max_new_tokens,
            stop_token_ids=(self.fmt.eot_id,),
            seed=c.seed,
            prompt_index_offset=offset,
        )

    def _out_row(self, p: dict[str, Any], text: str) -> dict[str, Any]:
        row = p["row"]
        out = {k: row[k] for k in ("key", "prompt", "messages", "instruction_id_list", "kwargs") if k in row}
        return {**out, "teacher_response": text, "teacher": self.teacher, "sampling": self.cfg.sampling_record()}

    def process(self, start: int, end: int) -> list[dict[str, Any]]:
        """One record per global index in [start, end): {"index", "row"} or {"index", "dropped": reason}."""
        recs: dict[int, dict[str, Any]] = {}
        todo = []
        for g in range(start, end):
            if self.deco is not None and self._contaminated(self.prompts[g]):
                recs[g] = {"index": g, "dropped": "contaminated"}
            else:
                todo.append(g)
        ids = dict(zip(todo, self.fmt.encode_prompts([self.prompts[g]["messages"] for g in todo])))
        fit = []
        for g in todo:
            if len(ids[g]) + self.cfg.max_new_tokens > self.max_model_len:
                recs[g] = {"index": g, "dropped": "too_long"}
            else:
                fit.append(g)
        # consecutive runs, so each request's prompt_index_offset is its first prompt's global index
        runs: list[list[int]] = []
        for g in fit:
            if runs and runs[-1][-1] == g - 1:
                runs[-1].append(g)
            else:
                runs.append([g])
        for run in runs:
            batch = self.engine.generate([list(map(int, ids[g])) for g in run], self._params(run[0]))
            for i, g in enumerate(run):
                s = batch.for_prompt(i)[0]
                recs[g] = self._judge(g, s)
        return [recs[g] for g in range(start, end)]

    def _judge(self, g: int, sample: Any) -> dict[str, Any]:
        toks = [t for t in sample.token_ids if t != self.fmt.eot_id]
        text = self.fmt.decode(toks, skip_special_tokens=True)
        if sample.finish_reason == "length" and self.cfg.drop_truncated:
            return {"index": g, "dropped": "truncated"}
        row = self.prompts[g]["row"]
        if self.reward is not None and row.get("instruction_id_list"):
            if self.reward.score([{**row, "prompt": _prompt_text(self.prompts[g]["messages"])}], [text])[0] < 1.0:
                return {"index": g, "dropped": "failed_constraints"}
        return {"index": g, "row": self._out_row(self.prompts[g], text)}


# --- the run -------------------------------------------------------------------------------------------

_STOP = {"requested": False}


def _on_usr1(signum: int, frame: Any) -> None:
    _STOP["requested"] = True  # finish the current chunk, then stop (the job is requeued and resumes)


def _check_manifest(parts: Path, manifest: dict[str, Any]) -> str | None:
    """Rank 0: create the parts folder or check it belongs to this run; clear half-written files."""
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp.*"):
        stale.unlink()
    file = parts / "manifest.json"
    if file.is_file():
        old = json.loads(file.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            return (
                f"{parts}: a previous run with other settings ({', '.join(diff)}) left chunks here; resume with "
                "the same settings, or delete the folder to start over"
            )
    else:
        atomic_write_lines(file, iter([json.dumps(manifest, indent=2) + "\n"]))
    return None


def merge(parts: Path, out: Path, n: int, chunk: int, meta: dict[str, Any], keys: list[Any]) -> dict[str, Any]:
    """Rank 0: chunk files -> the output, in prompt order, each prompt exactly once; returns the summary.

    Dropped prompts go to <output>.dropped.jsonl ({"index", "key", "reason"}), so every prompt is accounted for.
    """
    counts = {"prompts": n, "kept": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}}
    lines, dropped = [], []
    for c in range(math.ceil(n / chunk)):
        start, end = c * chunk, min(n, (c + 1) * chunk)
        recs = [json.loads(x) for x in chunk_file(parts, c).read_text(encoding="utf-8").splitlines() if x.strip()]
        if [r["index"] for r in recs] != list(range(start, end)):
            raise GenerateError(f"{chunk_file(parts, c)}: does not hold prompts {start}..{end - 1} exactly once")
        for r in recs:
            if "row" in r:
                counts["kept"] += 1
                lines.append(json.dumps(r["row"], ensure_ascii=False) + "\n")
            else:
                counts[f"dropped_{r['dropped']}"] += 1
                rec = {"index": r["index"], "key": keys[r["index"]], "reason": r["dropped"]}
                dropped.append(json.dumps(rec) + "\n")
    atomic_write_lines(out.with_name(out.name + ".dropped.jsonl"), iter(dropped))
    atomic_write_lines(out, iter(lines))
    summary = {**counts, **meta, "output": str(out)}
    atomic_write_lines(out.with_name(out.name + ".summary.json"), iter([json.dumps(summary, indent=2) + "\n"]))
    return summary


def _init_world(tp: int, dp: int) -> tuple[int, int]:
    """(rank, world) after checking world = DP x TP; starts torch.distributed when world > 1."""
    import datetime

    import torch
    import torch.distributed as dist

    from uniapl_megatron.distributed import read_env

    denv = read_env()
    if denv.world_size != tp * dp:
        raise GenerateError(
            f"world size {denv.world_size} != generate.data_parallel_size {dp} x teacher.tensor_parallel_size {tp}"
        )
    if denv.world_size > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(denv.local_rank)
        # long: engines finish their last chunks at different times before the merge
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=denv.rank,
            world_size=denv.world_size,
            init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
            timeout=datetime.timedelta(hours=12),
        )
    return denv.rank, denv.world_size


def _share(obj: Any, world: int) -> Any:
    """Rank 0's obj on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _total(n: int, world: int) -> int:
    if world == 1:
        return n
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


def run_generate(run: GenerateRun) -> dict[str, Any] | None:
    """Every rank: its engine's chunks; rank 0 then merges. Returns the summary on rank 0 when complete."""
    from uniapl_megatron.data.chat import ChatFormatter, load_tokenizer

    cfg, tp = run.generate, run.teacher.tensor_parallel_size
    rank, world = _init_world(tp, cfg.data_parallel_size)
    signal.signal(signal.SIGUSR1, _on_usr1)
    prompts = read_prompts(cfg.input_paths)
    out = Path(cfg.output_path)
    parts = out.with_name(out.name + ".parts")
    err = _check_manifest(parts, fingerprint(run, prompts)) if rank == 0 else None
    err = _share(err, world)
    if err:
        raise GenerateError(err)
    n_chunks = math.ceil(len(prompts) / cfg.chunk_size)
    replica = rank // tp
    todo = [c for c in range(n_chunks) if c % cfg.data_parallel_size == replica and not chunk_file(parts, c).exists()]
    written = 0
    if _total(len(todo), world):  # every rank builds its engine (vLLM's external launcher needs all of them)
        from uniapl_megatron.rollout import start_engine

        fmt = ChatFormatter(
            load_tokenizer(cfg.tokenizer_path or run.teacher.model_path), enable_thinking=cfg.enable_thinking
        )
        engine = start_engine(run.teacher)
        worker = None
        try:
            worker = ChunkWorker(run, prompts, engine, fmt)
            for c in todo:
                if _STOP["requested"]:
                    log.warning("rank %d: SIGUSR1: stopping before chunk %d; a rerun resumes", rank, c)
                    break
                recs = worker.process(c * cfg.chunk_size, min(len(prompts), (c + 1) * cfg.chunk_size))
                if rank % tp == 0:  # one writer per engine
                    atomic_write_lines(chunk_file(parts, c), (json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                    written += 1
                    log.info("rank %d: chunk %d/%d written", rank, c + 1, n_chunks)
        finally:
            engine.shutdown()
            if worker is not None and hasattr(worker.reward, "close"):
                worker.reward.close()  # its checker processes
    written = _total(written, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return None
    missing = [c for c in range(n_chunks) if not chunk_file(parts, c).exists()]
    if missing:
        log.warning("%d of %d chunks still to do; run again to resume", len(missing), n_chunks)
        return {"complete": False, "chunks_missing": len(missing), "chunks": n_chunks}
    meta = {
        "complete": True,
        "chunks": n_chunks,
        "chunks_this_run": written,
        "teacher": cfg.teacher_name or Path(run.teacher.model_path).name,
        "sampling": cfg.sampling_record(),
    }
    return merge(parts, out, len(prompts), cfg.chunk_size, meta, [p["row"].get("key") for p in prompts])


def cli_main(config: str, overrides: list[str]) -> int:
    """`uniapl generate`: one process starts DP x TP ranks itself; under torchrun / srun each rank runs."""
    import sys

    from uniapl_megatron.launch import run_ranks, under_launcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run = load_generate_config(config, overrides)
    except (GenerateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = run.generate.data_parallel_size * run.teacher.tensor_parallel_size
    if world > 1 and not under_launcher():
        return run_ranks([sys.executable, "-m", "uniapl_megatron.cli", "generate", config, *overrides], world)
    try:
        summary = run_generate(run)
    except (GenerateError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary), flush=True)
        return 0 if summary["complete"] else 3
    return 0


def plan_main(argv: list[str] | None = None) -> int:
    """For slurm/_launch.sh: check CONFIG against the allocation's world size, print its UNIAPL_* lines."""
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(description="check a generate config against a world size (slurm/_launch.sh)")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--world", type=int, required=True, help="ranks of the allocation (nodes x tasks per node)")
    args = ap.parse_args(argv)
    try:
        run = load_generate_config(args.config, args.overrides)
    except (GenerateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp, dp = run.teacher.tensor_parallel_size, run.generate.data_parallel_size
    if tp * dp != args.world:
        print(
            f"error: the allocation has {args.world} ranks but generate.data_parallel_size {dp} x "
            f"teacher.tensor_parallel_size {tp} = {tp * dp}; set data_parallel_size={args.world // tp}"
            + ("" if args.world % tp == 0 else f" (and a tensor_parallel_size dividing {args.world})"),
            file=sys.stderr,
        )
        return 2
    out = str(Path(run.generate.output_path).parent)
    for key, value in (
        ("UNIAPL_OUTPUT_DIR", out),
        ("UNIAPL_RESUME", "auto"),
        ("UNIAPL_ROLLOUT_MODE", "colocated"),
        ("UNIAPL_ROLLOUT_NODES", "0"),
    ):
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(plan_main())
