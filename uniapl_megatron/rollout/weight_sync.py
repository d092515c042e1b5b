"""Weight sync plumbing: (HF name, tensor) pairs in buckets of bounded size, broadcast from one sender
(the trainer rank that holds the full tensors) to the rollout processes. Nothing touches the disk.

Wire format of one bucket (all broadcast from `src`): an int64 header [meta_bytes, payload_bytes], the
metadata as UTF-8 JSON in a uint8 tensor (name, dtype, shape, byte offset of each tensor; no pickle), then
the payload as one flat uint8 tensor. A header of [0, 0] ends the sync; [-1, 0] aborts it.

Peak extra memory is bounded by the bucket: on the sender one bucket of source tensors plus its packed
copy, on each receiver one bucket (a tensor larger than the bucket travels alone, without a copy on the
sender). Receivers allocate each bucket afresh because a loader may keep views of a bucket until every
tensor of the same layer has arrived (vLLM loads layer by layer).
"""

from __future__ import annotations

import contextlib
import json
import socket
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

NamedTensor = tuple[str, torch.Tensor]
WeightsSource = Callable[[], Iterable[NamedTensor]]
_ALIGN = 64  # byte alignment of each tensor inside a bucket (any dtype view is then aligned)
_DTYPES = {
    str(d): d
    for d in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.update({str(d): d for d in (torch.float8_e4m3fn, torch.float8_e5m2)})


class WeightSyncError(RuntimeError):
    """A sync could not be sent or received; the message says which tensor or step."""


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def bucketize(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group pairs, in order, into lists of at most `bucket_bytes` (aligned); an oversized tensor alone.

    Lazy: holds at most one bucket's worth of the source's tensors at a time.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: expected an integer >= 1, got {bucket_bytes!r}")
    bucket: list[NamedTensor] = []
    size = 0
    for name, t in named_tensors:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WeightSyncError(
                f"weights must be (str, torch.Tensor) pairs, got ({type(name).__name__}, {type(t).__name__})"
            )
        n = _aligned(nbytes(t))
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


class HeldBytes:
    """How many bytes a weight sync holds at once beyond the model itself: every tensor it allocates (gathered
    shards, full tensors, buckets; `add`, e.g. as Student.hf_tensors' track) or hands out (`track`) counts
    until its storage is freed, wherever that happens (a view keeps its whole base alive and is counted with
    it); tensors sharing storage with the model's own parameters (nothing copied) do not count."""

    def __init__(self, model_params: Iterable[torch.Tensor] = ()) -> None:
        self._model = {p.untyped_storage().data_ptr() for p in model_params}
        self._live: set[int] = set()
        self.now = 0
        self.peak = 0

    def _free(self, key: int, n: int) -> None:
        self._live.discard(key)
        self.now -= n

    def add(self, t: torch.Tensor) -> None:
        """Count a tensor the sync allocated (or handed out) until its storage is freed."""
        base = t._base if t._base is not None else t
        key = id(base)
        if key not in self._live and base.untyped_storage().data_ptr() not in self._model:
            n = base.untyped_storage().nbytes()
            self._live.add(key)
            self.now += n
            self.peak = max(self.peak, self.now)
            weakref.finalize(base, self._free, key, n)

    def track(self, named_tensors: Iterable[NamedTensor]) -> Iterator[NamedTensor]:
        """Pass the pairs on, counting each tensor (see add)."""
        for name, t in named_tensors:
            self.add(t)
            yield name, t


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SyncStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0


class WeightChannel:
    """A broadcast group of its own (sender + rollout ranks), independent of any default process group.

    Built straight from a TCPStore, so it works next to the trainer's torch.distributed world and next to
    the group vLLM creates in-process. Rank 0 hosts the store. Backend "gloo" (CPU tensors) or "nccl"
    (tensors on `device`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        device: str | torch.device = "cpu",
        timeout_s: float = 600.0,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device)
        timeout = timedelta(seconds=timeout_s)
        try:
            self._store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        except Exception as e:  # noqa: BLE001 - the store's own errors do not say which address
            raise WeightSyncError(
                f"weight channel: cannot reach the store at {host}:{port} as rank {rank} of {world_size}: {e}"
            ) from e
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            opts._timeout = timeout
            # host is rank 0's address: the other ranks (rollout nodes) bind their own interface, unless all
            # of them are on this machine (a loopback host).
            local = rank == 0 or host in ("127.0.0.1", "localhost", "::1")
            opts._devices = [
                ProcessGroupGloo.create_device(hostname=host) if local else ProcessGroupGloo.create_default_device()
            ]
            self._group = ProcessGroupGloo(self._store, rank, world_size, opts)
        else:
            from torch.distributed import ProcessGroupNCCL

            torch.cuda.set_device(self.device)
            self._group = ProcessGroupNCCL(self._store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._group.broadcast([tensor], opts).wait()

    def close(self) -> None:
        group, self._group = getattr(self, "_group", None), None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._store = None


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def send_weights(
    named_tensors: Iterable[NamedTensor], channel: WeightChannel, bucket_bytes: int, src: int = 0
) -> SyncStats:
    """Broadcast every pair from rank `src` of `channel`, bucket by bucket; returns what was sent.

    If the source or the packing fails half-way, the receivers get an abort marker (they raise instead of
    waiting for the rest) and the error is re-raised here."""
    try:
        return _send(named_tensors, channel, bucket_bytes, src)
    except Exception:
        with contextlib.suppress(Exception):  # a broken channel cannot carry the marker either
            channel.broadcast(torch.tensor([-1, 0], dtype=torch.int64, device=channel.device), src)
        raise


def _send(named_tensors: Iterable[NamedTensor], channel: WeightChannel, bucket_bytes: int, src: int) -> SyncStats:
    stats = SyncStats()
    dev = channel.device
    for bucket in bucketize(named_tensors, bucket_bytes):
        meta, offset = [], 0
        for name, t in bucket:
            if str(t.dtype) not in _DTYPES:
                raise WeightSyncError(f"tensor {name}: dtype {t.dtype} cannot be sent")
            meta.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "offset": offset})
            offset += _aligned(nbytes(t))
        total = sum(nbytes(t) for _, t in bucket) if len(bucket) == 1 else offset
        if len(bucket) == 1 and bucket[0][1].device == dev:
            payload = _bytes_view(bucket[0][1])  # oversized or lone tensor: no copy
        else:
            payload = torch.empty(total, dtype=torch.uint8, device=dev)
            for (_, t), m in zip(bucket, meta):
                payload[m["offset"] : m["offset"] + nbytes(t)].copy_(_bytes_view(t), non_blocking=True)
        meta_bytes = json.dumps(meta).encode()
        channel.broadcast(torch.tensor([len(meta_bytes), total], dtype=torch.int64, device=dev), src)
        channel.broadcast(torch.frombuffer(bytearray(meta_bytes), dtype=torch.uint8).to(dev), src)
        channel.broadcast(payload, src)
        stats.tensors += len(bucket)
        stats.bytes += total
        stats.buckets += 1
        del payload
    channel.broadcast(torch.zeros(2, dtype=torch.int64, device=dev), src)
    return stats


def receive_weights(channel: WeightChannel, src: int = 0) -> Iterator[NamedTensor]:
    """Yield the pairs that rank `src` broadcasts, as they arrive, until the end marker."""
    dev = channel.device
    while True:
        header = torch.empty(2, dtype=torch.int64, device=dev)
        channel.broadcast(header, src)
        meta_len, total = (int(x) for x in header.tolist())
        if meta_len == 0:
            return
        if meta_len < 0:
            raise WeightSyncError(f"weight channel: rank {src} aborted the sync half-way (see its error)")
        meta_t = torch.empty(meta_len, dtype=torch.uint8, device=dev)
        channel.broadcast(meta_t, src)
        try:
            meta = json.loads(meta_t.cpu().numpy().tobytes().decode())
        except ValueError as e:
            raise WeightSyncError(f"weight channel: unreadable bucket metadata from rank {src}: {e}") from e
        payload = torch.empty(total, dtype=torch.uint8, device=dev)
        channel.broadcast(payload, src)
        for m in meta:
            dtype = _DTYPES.get(m["dtype"])
            if dtype is None:
                raise WeightSyncError(f"tensor {m['name']}: unknown dtype {m['dtype']!r} from rank {src}")
            shape = torch.Size(m["shape"])
            n = shape.numel() * torch.empty((), dtype=dtype).element_size()
            yield m["name"], payload[m["offset"] : m["offset"] + n].view(dtype).view(shape)
        del payload
