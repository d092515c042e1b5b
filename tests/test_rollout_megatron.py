"""vLLM engine against the Megatron student (real megatron-core on gloo):

- disaggregated, TP=2 x PP=2 student (four processes) -> this process's rollout TP=1 engine: the engine's
  sampled-token log-probs equal the student's (fp32, <= 1e-4); after one optimizer step and a sync (full HF
  tensors gathered from the shards, broadcast in buckets) the engine's greedy continuations equal the
  student's; without the sync they differ.
- colocated: TP=2, then PP=2, student and one rollout TP=2 engine in the same two processes (vLLM's external
  launcher), refit by the trainer's own path from random start-up weights: the engine's greedy continuations
  equal the student's, and no rank holds more than one bucket plus one layer's gathered tensors for it
  (the model is over 4x that).

Run as a script, this file is the worker of one Megatron rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GREEDY_TOKENS = 6
TEMPERATURE = 0.8


# ---- the Megatron ranks -------------------------------------------------------------------------------


def _greedy(student, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuation with the student itself (full forward each step, no KV cache); all ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from uniapl_megatron.convert.params import unwrap

    seqs = [list(p) for p in prompts]
    heads = {id(h.layer): h for h in student.heads}
    for c in student.chunks:
        c.eval()
    last = ps.get_pipeline_model_parallel_last_rank()
    for _ in range(steps):
        tokens = torch.tensor(seqs)  # equal prompt lengths: one batch, no padding
        b, s = tokens.shape
        positions = torch.arange(s).unsqueeze(0).expand(b, -1)
        captured = {}

        def forward_step(data_iter, model):
            m = unwrap(model)
            if m.post_process:  # plain logits for this pass, not the log-prob head
                del m.output_layer.forward
            out = model(tokens, positions, attention_mask=None)
            if m.post_process:
                m.output_layer.forward = heads[id(m.output_layer)].forward

            def loss_fn(output):
                captured["logits"] = output.detach()
                return output.sum() * 0.0, {}

            return out, loss_fn

        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([None]),
                model=student.chunks,
                num_microbatches=1,
                seq_length=s,
                micro_batch_size=b,
                forward_only=True,
            )
        nxt = torch.zeros(b, dtype=torch.int64)
        if ps.is_pipeline_last_stage():
            logits = captured["logits"][:, -1]
            parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
            nxt = torch.cat(parts, dim=-1)[:, : student.arch.vocab_size].argmax(-1)
        # Both TP ranks of the last stage hold the same argmax; each pipeline group passes it back.
        dist.broadcast(nxt, src=last, group=ps.get_pipeline_model_parallel_group())
        for row, t in zip(seqs, nxt.tolist()):
            row.append(t)
    return [row[len(p) :] for row, p in zip(seqs, prompts)]


def _student(hf: str, tp: int, pp: int):
    from uniapl_megatron.distributed import init_distributed
    from uniapl_megatron.models.arch import Qwen3Arch
    from uniapl_megatron.models.qwen3 import ModelConfig
    from uniapl_megatron.parallel import ParallelConfig
    from uniapl_megatron.trainer.optim import OptimConfig
    from uniapl_megatron.trainer.student import Student

    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    init_distributed(par, seed=7)
    # Adam with a huge eps is SGD with lr/eps: a large, deterministic step.
    student = Student(
        Qwen3Arch.from_pretrained(hf),
        par,
        ModelConfig(dtype="fp32", spec="torch"),
        OptimConfig(lr=300.0, adam_eps=1000.0, clip_grad=0.0),
    )
    student.load_hf(hf)
    return student


def _sft_step(student) -> None:
    """One optimizer step on random demonstrations: the weights move enough to change greedy outputs."""
    from uniapl_megatron.objective import ObjectiveConfig, resolve_weights
    from uniapl_megatron.trainer.batch import Seq
    from uniapl_megatron.trainer.update import PolicyUpdate

    g = torch.Generator().manual_seed(0)
    demos = [
        Seq(torch.randint(0, student.arch.vocab_size, (24,), generator=g).tolist(), 6, True, 0.0, 0.0) for _ in range(4)
    ]
    cfg = ObjectiveConfig(algorithm="sft")
    PolicyUpdate(student, cfg, 4096)(demos, resolve_weights(cfg, 0))


def _student_logprobs(student, samples: list[dict], temperature: float) -> list[list[float]] | None:
    """The student's log-probs of each sample's tokens (last pipeline stage; None elsewhere)."""
    from uniapl_megatron.data.packing import pack_sequences
    from uniapl_megatron.trainer.student import MicroBatch

    packed = pack_sequences([s["prompt"] + s["tokens"] for s in samples], [len(s["prompt"]) for s in samples])
    lps = student.logprobs([MicroBatch(packed)], temperature=temperature)
    return None if lps is None else [x.tolist() for x in packed.unpack_response(lps[0])]


def _write_rank0(out: dict, path: str) -> None:
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps({k: v for d in gathered for k, v in d.items()}))
        os.replace(tmp, path)
    dist.barrier()


def disaggregated_worker(a: argparse.Namespace) -> None:
    """TP=2 x PP=2 student; rank 0 broadcasts the synced weights to the test's own engine."""
    import torch.distributed as dist

    from uniapl_megatron.rollout.weight_sync import WeightChannel, send_weights

    inp = json.loads(Path(a.inp).read_text())
    student = _student(a.hf, tp=2, pp=2)
    out: dict = {}
    lps = _student_logprobs(student, inp["samples"], inp["temperature"])
    if lps is not None:
        out["logprobs"] = lps
    _sft_step(student)
    out["greedy_after_step"] = _greedy(student, inp["greedy_prompts"], GREEDY_TOKENS)
    tensors = student.hf_tensors()  # collective: every rank iterates it; rank 0 sends
    if dist.get_rank() == 0:
        ch = WeightChannel("127.0.0.1", a.port, 0, 2, timeout_s=300)
        out["sent_tensors"] = send_weights(tensors, ch, bucket_bytes=1 << 20).tensors
        ch.close()
    for _ in tensors:
        pass
    _write_rank0(out, a.out)


def _hf_bytes(student) -> tuple[int, int]:
    """(all HF tensors, the largest decoder layer or other unit) in bytes, from the converter's shape table."""
    import re

    from uniapl_megatron.convert.mapping import expected_hf_shapes

    units: dict[str, int] = {}
    for name, shape in expected_hf_shapes(student.arch).items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        n = 4
        for d in shape:
            n *= d
        units[m.group(0) if m else name] = units.get(m.group(0) if m else name, 0) + n
    return sum(units.values()), max(units.values())


def colocated_worker(a: argparse.Namespace) -> None:
    """Two ranks, each TP=2 then PP=2 student layouts in turn, and in the same two processes one vLLM engine
    of rollout TP=2 (external launcher) started from random weights: the trainer's refit (trainer.rollout_step
    .refit) streams the student's weights in, with the bytes each rank holds for it measured."""
    from megatron.core import parallel_state as ps

    from uniapl_megatron.rollout import RolloutConfig, SamplingParams
    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine
    from uniapl_megatron.trainer.rollout_step import refit

    inp = json.loads(Path(a.inp).read_text())
    prompts = inp["greedy_prompts"]  # ranks of one rollout TP group must ask for the same prompts
    engine, out = None, {}
    for tp, pp in ((2, 1), (1, 2)):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        student = _student(a.hf, tp=tp, pp=pp)
        _sft_step(student)
        if engine is None:
            engine = VLLMRolloutEngine(
                RolloutConfig(
                    model_path=a.hf,
                    load_format="dummy",
                    tensor_parallel_size=2,
                    work_dir=a.work,
                    max_model_len=128,
                    kv_cache_bytes=32 << 20,
                    enforce_eager=True,
                )
            )
        held = refit(engine, student, inp["bucket_bytes"])
        engine.sleep()  # CPU: no-ops; the trainer's colocated step calls them around training
        engine.wake()
        key = f"tp{tp}pp{pp}"
        out[f"{key}_greedy_student_r{a.rank}"] = _greedy(student, prompts, GREEDY_TOKENS)
        out[f"{key}_greedy_engine_r{a.rank}"] = [
            s.token_ids
            for s in engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=GREEDY_TOKENS)).samples
        ]
        out[f"{key}_held_r{a.rank}"] = held
        out["model_bytes"], out["unit_bytes"] = _hf_bytes(student)
    engine.shutdown()
    _write_rank0(out, a.out)


def worker() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["disaggregated", "colocated"], required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--inp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--work", default="")
    a = ap.parse_args()
    a.rank = int(os.environ.get("RANK", "0"))
    (disaggregated_worker if a.mode == "disaggregated" else colocated_worker)(a)


# ---- the test -----------------------------------------------------------------------------------------


def _student_step_and_sync(engine: Any, model: Path, tmp_path: Path) -> dict:
    """4 ranks of this file (--mode disaggregated) take one step of the student from in.json and broadcast its
    weights to `engine`, which receives them here meanwhile; the ranks' out.json."""
    from uniapl_megatron.launch import run_ranks
    from uniapl_megatron.rollout.weight_sync import free_port

    port, result = free_port(), {}
    argv = [
        sys.executable,
        __file__,
        "--mode",
        "disaggregated",
        "--hf",
        str(model),
        "--inp",
        str(tmp_path / "in.json"),
        "--out",
        str(tmp_path / "out.json"),
        "--port",
        str(port),
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    ranks = threading.Thread(target=lambda: result.setdefault("code", run_ranks(argv, 4, env=env, timeout=500)))
    ranks.start()
    try:
        engine.connect("127.0.0.1", port, world_size=2, timeout_s=400)
        engine.receive_weights()
    finally:
        ranks.join()
    assert result["code"] == 0
    return json.loads((tmp_path / "out.json").read_text())


def test_engine_follows_the_megatron_student(tmp_path):
    from _models import tiny_qwen3

    from uniapl_megatron.rollout import RolloutConfig, SamplingParams
    from uniapl_megatron.rollout.vllm_engine import VLLMRolloutEngine

    # Tied embeddings, as Qwen3-0.6B: the sync must also refresh vLLM's own LM-head copy.
    model = tiny_qwen3(tmp_path / "hf", tie=True, vocab=512, layers=4, hidden=64)
    work = tmp_path / "vllm_work"
    engine = VLLMRolloutEngine(
        RolloutConfig(
            model_path=str(model), work_dir=str(work), max_model_len=128, kv_cache_bytes=32 << 20, enforce_eager=True
        )
    )
    try:
        prompts = [[11, 12, 13, 14, 15], [200, 7, 9, 300, 41], [5, 5, 5, 5, 5]]
        params = SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=10, seed=4)
        batch = engine.generate(prompts, params)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_TOKENS)
        before = [s.token_ids for s in engine.generate(prompts, greedy).samples]
        inp = {
            "temperature": TEMPERATURE,
            "greedy_prompts": prompts,
            "samples": [{"prompt": prompts[s.prompt_index], "tokens": s.token_ids} for s in batch.samples],
        }
        (tmp_path / "in.json").write_text(json.dumps(inp))
        out = _student_step_and_sync(engine, model, tmp_path)
        after = [s.token_ids for s in engine.generate(prompts, greedy).samples]
    finally:
        engine.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    worst = max(
        float((torch.tensor(s.logprobs) - torch.tensor(ref)).abs().max())
        for s, ref in zip(batch.samples, out["logprobs"])
    )
    assert worst <= 1e-4, worst
    assert out["sent_tensors"] == engine.last_sync.tensors > 0
    assert after == out["greedy_after_step"]  # synced: the engine continues as the student does
    assert before != out["greedy_after_step"]  # the step changed the student: without the sync they differ


if __name__ == "__main__":
    worker()


@pytest.mark.slow
def test_refit_from_local_shards_holds_a_bucket_not_the_model(tmp_path):
    from _models import tiny_qwen3

    from uniapl_megatron.launch import run_ranks

    # Ten layers that outweigh the embedding: the whole model is ~2.2 MB, one layer ~0.2 MB.
    model = tiny_qwen3(tmp_path / "hf", tie=False, vocab=512, layers=10, hidden=64)
    bucket = 256 << 10
    prompts = [[11, 12, 13, 14, 15], [200, 7, 9, 300, 41]]
    (tmp_path / "in.json").write_text(json.dumps({"greedy_prompts": prompts, "bucket_bytes": bucket}))
    work = tmp_path / "vllm_work"
    argv = [
        sys.executable,
        __file__,
        "--mode",
        "colocated",
        "--hf",
        str(model),
        "--inp",
        str(tmp_path / "in.json"),
        "--out",
        str(tmp_path / "out.json"),
        "--work",
        str(work),
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    assert run_ranks(argv, 2, env=env, timeout=600) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    # One bucket (a layer larger than the bucket travels alone) plus one layer's TP-gathered tensors.
    bound = max(bucket, out["unit_bytes"]) + out["unit_bytes"]
    assert 4 * bound < out["model_bytes"], out
    for key in ("tp2pp1", "tp1pp2"):
        for r in (0, 1):
            # The engine, synced from random start-up weights, continues exactly as the trained student.
            assert out[f"{key}_greedy_engine_r{r}"] == out[f"{key}_greedy_student_r{r}"], key
            assert 0 < out[f"{key}_held_r{r}"] <= bound, (key, r, out[f"{key}_held_r{r}"], bound, out["unit_bytes"])
    assert not (work / "tmp").exists() and not (work / "rpc").exists()
