"""HF folder <-> Megatron distributed checkpoint (torch_dist), at any parallel layout.

A converted checkpoint folder holds::

    uniapl_checkpoint.json   what the weights are (HF config, dtype, KV groups) — written last
    hf/                      config.json, generation_config.json and tokenizer files of the source
    model/                   Megatron's distributed checkpoint: loadable at any other TP / PP / EP

Every rank of the layout runs these functions (torchrun / srun / tools/convert_hf.py spawns them).
Output goes to a temporary folder that is renamed into place at the very end.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distributed import collective_device
from ..models.arch import Qwen3Arch
from ..parallel import ParallelConfig
from .mapping import expected_hf_shapes
from .params import ConversionError, finish_param_gather, iter_stage, load_from_hf, plan_stage, unwrap
from .safetensors_io import INDEX_NAME, SafetensorsFolder, StreamingSafetensorsWriter

if TYPE_CHECKING:
    from ..models.qwen3 import ModelConfig

META_NAME = "uniapl_checkpoint.json"
FORMAT = "uniapl-mcore-v1"
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


# ---- checks that need no process group (the CLI runs them before spawning ranks) ------------------------


def check_output(out: str | Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out}: output folder exists; pass --force to replace it")


def check_hf_source(hf_dir: str | Path) -> tuple[Qwen3Arch, SafetensorsFolder]:
    """Config and tensor names agree before any work is done: missing/unexpected tensors are named."""
    arch = Qwen3Arch.from_pretrained(hf_dir)
    src = SafetensorsFolder(hf_dir)
    expected = expected_hf_shapes(arch)
    have = set(src.keys())
    # Tied checkpoints sometimes carry lm_head anyway; it must then equal the embedding (checked at load).
    extra = sorted(have - set(expected) - ({"lm_head.weight"} if arch.tie_word_embeddings else set()))
    missing = sorted(set(expected) - have)
    if missing or extra:
        msg = [
            f"{hf_dir}: the tensors do not match config.json ({arch.model_type}, {arch.num_layers} layers"
            + (f", {arch.num_experts} experts" if arch.is_moe else "")
            + ")"
        ]
        if missing:
            msg.append(f"  missing ({len(missing)}): " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if extra:
            msg.append(f"  unexpected ({len(extra)}): " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
        raise ConversionError("\n".join(msg))
    for name, shape in src.shapes().items():
        if name in expected and shape != expected[name]:
            raise ConversionError(
                f"{hf_dir}: tensor {name!r} has shape {shape} but config.json implies {expected[name]}"
            )
    return arch, src


def read_meta(mcore_dir: str | Path) -> dict[str, Any]:
    path = Path(mcore_dir) / META_NAME
    if not path.is_file():
        raise ConversionError(
            f"{mcore_dir}: no {META_NAME} (not a checkpoint written by tools/convert_hf.py import"
            " or the trainer, or an interrupted write)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


# ---- helpers ---------------------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _tmp_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _begin(out: Path) -> Path:
    """Rank 0 clears any leftover of an interrupted run; everyone gets the temporary folder."""
    tmp = _tmp_for(out)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def _commit(tmp: Path, out: Path, force: bool) -> None:
    dist.barrier()
    if _rank() == 0:
        if out.exists():
            if not force:
                raise ConversionError(f"{out}: appeared while converting; pass --force to replace it")
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()


def _write_json(path: Path, obj: Any) -> None:
    part = path.with_suffix(path.suffix + ".tmp")
    part.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(part, path)


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=_rank() != 0, mininterval=1.0)


# ---- import ----------------------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path, out: str | Path, parallel: ParallelConfig, dtype: str, force: bool = False) -> None:
    """HF safetensors folder -> Megatron distributed checkpoint, written by this layout's ranks."""
    # Megatron is imported where a model is built: the CLI's checks and rank launcher do without it.
    from ..models.qwen3 import ModelConfig, build_model, padded_vocab_size

    out = Path(out)
    check_output(out, force)
    arch, src = check_hf_source(hf_dir)
    tmp = _begin(out)
    model_cfg = ModelConfig(dtype=dtype, spec="torch" if not torch.cuda.is_available() else "auto")
    chunks = build_model(arch, parallel, model_cfg, initialize=False)
    groups = parallel.num_query_groups(arch)
    vocab = padded_vocab_size(
        arch.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size
    )
    bar = _progress(src.total_bytes() // max(1, dist.get_world_size()), "import: load shards")
    load_from_hf(chunks, arch, src.get, groups, vocab, on_param=bar.update)
    bar.close()
    if arch.tie_word_embeddings and "lm_head.weight" in src.keys():
        if not torch.equal(src.get("lm_head.weight"), src.get("model.embed_tokens.weight")):
            raise ConversionError(f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from the embedding")
    save_model(chunks, tmp / "model")
    if _rank() == 0:
        hf_side = tmp / "hf"
        hf_side.mkdir()
        for name in HF_SIDE_FILES:
            if (Path(hf_dir) / name).is_file():
                shutil.copy2(Path(hf_dir) / name, hf_side / name)
        _write_json(
            tmp / META_NAME,
            {
                "format": FORMAT,
                "dtype": dtype,
                "num_query_groups": groups,
                "make_vocab_size_divisible_by": model_cfg.make_vocab_size_divisible_by,
                "arch": arch.to_dict(),
                "source": str(Path(hf_dir).resolve()),
                "written_at_layout": asdict(parallel),
            },
        )
    _commit(tmp, out, force)


def save_model(chunks: list[torch.nn.Module], folder: Path) -> None:
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(folder))


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    finish_param_gather([unwrap(c) for c in chunks])  # a checkpoint must hold the gathered weights
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def load_model(chunks: list[torch.nn.Module], folder: Path, piece: dict[str, Any] | None = None) -> None:
    """Fill model chunks (already built for this layout) from a Megatron distributed checkpoint: all of it,
    or one `piece` of their sharded state dict (see _load_parts)."""
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        # Access integrity (every shard of a key read by someone) is Megatron's whole-checkpoint check; a
        # piece is a subset by construction, and together the pieces are the whole model.
        state = dist_checkpointing.load(
            model_sharded_state_dict(chunks) if piece is None else piece,
            str(folder),
            validate_access_integrity=piece is None,
        )
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(state if len(chunks) == 1 else state.get(f"model{i}", {}), strict=False)


def _model_for(
    mcore_dir: str | Path, parallel: ParallelConfig, model_cfg: ModelConfig | None = None
) -> tuple[Qwen3Arch, list[torch.nn.Module], dict[str, Any]]:
    """The model a checkpoint describes, built for this layout, weights not yet loaded."""
    from ..models.qwen3 import ModelConfig, build_model

    meta = read_meta(mcore_dir)
    arch = Qwen3Arch(**{**meta["arch"], "moe_layers": tuple(meta["arch"]["moe_layers"])})
    model_cfg = model_cfg or ModelConfig(dtype=meta["dtype"], spec="torch" if not torch.cuda.is_available() else "auto")
    chunks = build_model(arch, parallel, model_cfg, initialize=False, num_query_groups=meta["num_query_groups"])
    return arch, chunks, meta


def build_from_checkpoint(
    mcore_dir: str | Path, parallel: ParallelConfig, model_cfg: ModelConfig | None = None
) -> tuple[Qwen3Arch, list[torch.nn.Module], dict[str, Any]]:
    arch, chunks, meta = _model_for(mcore_dir, parallel, model_cfg)
    load_model(chunks, Path(mcore_dir) / "model")
    return arch, chunks, meta


def _load_parts(chunks: list[torch.nn.Module], parts: int) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The model's sharded state dict cut into `parts` pieces of similar size, by checkpoint key (Megatron
    stores every layer's copy of a weight stacked under one key, loadable only as a whole), and for each
    parameter storage the piece after which it is complete. Every rank gets the same number of pieces:
    each load is a collective over the whole world."""
    sd = model_sharded_state_dict(chunks)
    entries = (
        [((outer, k), v) for outer, d in sd.items() for k, v in d.items()]
        if len(chunks) > 1
        else [((None, k), v) for k, v in sd.items()]
    )
    by_key: dict[str, list] = {}
    for path, v in entries:
        by_key.setdefault(getattr(v, "key", path[1]), []).append((path, v))

    def nbytes(v: Any) -> int:
        d = getattr(v, "data", None)
        return d.numel() * d.element_size() if isinstance(d, torch.Tensor) else 0

    keys = list(by_key)
    n = torch.tensor([min(parts, len(keys))], device=collective_device())
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n = int(n.item())
    sizes = [sum(nbytes(v) for _, v in by_key[k]) for k in keys]
    total, before, prev = max(sum(sizes), 1), 0, -1
    pieces: list[dict[str, Any]] = [{} for _ in range(n)]
    done_after: dict[int, int] = {}
    for i, key in enumerate(keys):
        # By byte share, but never skipping a piece and leaving one key at least for every later piece.
        g = min(prev + 1, max(prev, min(before * n // total, n - 1), n - len(keys) + i))
        for (outer, k), v in by_key[key]:
            (pieces[g].setdefault(outer, {}) if outer is not None else pieces[g])[k] = v
            d = getattr(v, "data", None)
            if isinstance(d, torch.Tensor):
                ptr = d.untyped_storage().data_ptr()
                done_after[ptr] = max(done_after.get(ptr, 0), g)
        before, prev = before + sizes[i], g
    return pieces, done_after


def iter_checkpoint(
    mcore_dir: str | Path, chunks: list[torch.nn.Module], arch: Qwen3Arch, num_query_groups: int, parts: int = 4
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_stage` over a model whose weights are still on disk: the checkpoint is read in `parts`
    pieces and each piece's tensors are yielded before the next is read, so a consumer that writes them
    in the background overlaps the reading. Yields by piece, not in model order. Collective."""
    pieces, done_after = _load_parts(chunks, parts)
    for g, piece in enumerate(pieces):
        load_model(chunks, Path(mcore_dir) / "model", piece)
        yield from iter_stage(
            chunks, arch, num_query_groups, only=lambda p, g=g: done_after.get(p.untyped_storage().data_ptr(), -1) == g
        )


# ---- export ----------------------------------------------------------------------------------------------


def _split_files(plan: list, max_bytes: int) -> list[list]:
    files, cur, size = [], [], 0
    for item in plan:
        nbytes = torch.Size(item[1]).numel() * torch.empty((), dtype=item[2]).element_size()
        if cur and size + nbytes > max_bytes:
            files.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += nbytes
    if cur:
        files.append(cur)
    return files


def export_hf(
    mcore_dir: str | Path,
    out: str | Path,
    parallel: ParallelConfig,
    force: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Megatron checkpoint -> HF folder (safetensors shards + index + config + tokenizer files).

    Each pipeline stage's writer rank (TP rank 0, DP rank 0) streams its own files; rank 0 writes the index.
    """
    from megatron.core import parallel_state as ps

    out = Path(out)
    check_output(out, force)
    arch, chunks, meta = _model_for(mcore_dir, parallel)
    tmp = _begin(out)
    plan = plan_stage(chunks, arch)
    writer = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    my_files = _split_files(plan, max_shard_bytes) if writer else []
    all_files: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(all_files, (ps.get_pipeline_model_parallel_rank(), my_files))
    ordered = [f for _, files in sorted((x for x in all_files if x[1]), key=lambda x: x[0]) for f in files]
    n = len(ordered)
    first = sum(len(files) for pp, files in all_files if files and pp < ps.get_pipeline_model_parallel_rank())
    names = [f"model-{first + i + 1:05d}-of-{n:05d}.safetensors" for i in range(len(my_files))]
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d in plan)
    bar = _progress(total, "export: write shards")
    stream = iter_checkpoint(mcore_dir, chunks, arch, meta["num_query_groups"])
    if writer:
        files = [StreamingSafetensorsWriter(tmp / fname, fplan) for fname, fplan in zip(names, my_files)]
        by_name = {name: w for w, fplan in zip(files, my_files) for name, _, _ in fplan}
        with _BackgroundWrites(bar) as bg:  # file writes overlap the next piece's checkpoint read
            for name, t in stream:
                bg.put(by_name[name], name, t)
        for w in files:
            w.close()
    for _ in stream:  # non-writers still take part in the collectives
        pass
    bar.close()
    if _rank() == 0:
        weight_map = {}
        for i, fplan in enumerate(ordered):
            for name, _, _ in fplan:
                weight_map[name] = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": _total(ordered)}, "weight_map": weight_map})
        hf_side = Path(mcore_dir) / "hf"
        for name in HF_SIDE_FILES:
            if (hf_side / name).is_file():
                shutil.copy2(hf_side / name, tmp / name)
        if not (tmp / "config.json").is_file():
            raise ConversionError(f"{hf_side}: config.json is missing from the checkpoint")
        cfg = json.loads((tmp / "config.json").read_text())
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[meta["dtype"]]
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = torch_dtype
        _write_json(tmp / "config.json", cfg)
    _commit(tmp, out, force)


class _BackgroundWrites:
    """One thread writing (file, name, tensor) items while the caller produces the next ones. File writes
    release the GIL, so they overlap checkpoint reads; the queue bounds what waits to be written."""

    def __init__(self, bar: tqdm, depth: int = 16) -> None:
        self.bar, self.queue = bar, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="export-writer", daemon=True)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after a failure keep draining, so the producer never blocks
                try:
                    item[0].write(item[1], item[2])
                    self.bar.update(item[2].numel() * item[2].element_size())
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = e

    def put(self, w: StreamingSafetensorsWriter, name: str, t: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((w, name, t))

    def __enter__(self) -> "_BackgroundWrites":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def _total(files: list[list]) -> int:
    return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for f in files for _, s, d in f)


__all__ = [
    "import_hf",
    "export_hf",
    "build_from_checkpoint",
    "save_model",
    "load_model",
    "read_meta",
    "check_hf_source",
    "check_output",
]
