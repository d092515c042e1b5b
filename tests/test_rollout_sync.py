"""Weight sync plumbing: buckets, and a real gloo broadcast between two processes (no disk, no pickle)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from uniapl_megatron.rollout.weight_sync import (
    WeightChannel,
    WeightSyncError,
    bucketize,
    free_port,
    nbytes,
    receive_weights,
    send_weights,
)

BUCKET = 4096


def named_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [(f"model.layers.{i}.w", torch.randn(13 + i, 7, generator=g)) for i in range(6)]
    out.append(("bf16", torch.randn(33, 5, generator=g).to(torch.bfloat16)))
    out.append(("scalar", torch.tensor(3.5)))
    out.append(("transposed", torch.randn(9, 4, generator=g).t()))  # not contiguous
    out.append(("big", torch.randn(3000, generator=g)))  # 12 kB: larger than a bucket, travels alone
    out.append(("ints", torch.arange(10, dtype=torch.int64)))
    return out


def test_buckets_keep_order_and_bound_size():
    pulled = []

    def source():
        for name, t in named_tensors():
            pulled.append(name)
            yield name, t

    buckets = bucketize(source(), BUCKET)
    first = next(buckets)
    # Lazy: only one tensor beyond the first bucket has been read from the source.
    assert len(pulled) == len(first) + 1
    rest = list(buckets)
    all_buckets = [first, *rest]
    assert [n for b in all_buckets for n, _ in b] == [n for n, _ in named_tensors()]
    for b in all_buckets:
        size = sum(-(-nbytes(t) // 64) * 64 for _, t in b)
        assert size <= BUCKET or len(b) == 1
    assert [n for n, _ in next(b for b in all_buckets if b[0][0] == "big")] == ["big"]
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(bucketize(iter(named_tensors()), 0))
    with pytest.raises(WeightSyncError, match=r"\(str, torch.Tensor\)"):
        next(bucketize(iter([("x", [1, 2])]), BUCKET))


def _sender(port: int, world: int, bucket: int, q) -> None:
    ch = WeightChannel("127.0.0.1", port, 0, world)
    stats = send_weights(iter(named_tensors()), ch, bucket)
    q.put((stats.tensors, stats.bytes, stats.buckets))
    ch.close()


@pytest.mark.parametrize("bucket", [BUCKET, 1 << 20])
def test_broadcast_between_processes_is_exact(bucket):
    ctx = mp.get_context("spawn")
    port, q = free_port(), ctx.Queue()
    p = ctx.Process(target=_sender, args=(port, 2, bucket, q))
    p.start()
    try:
        ch = WeightChannel("127.0.0.1", port, 1, 2)
        got = []
        for name, t in receive_weights(ch):
            # The receiver's memory per bucket: each tensor is a view of one bucket buffer, never more
            # than the bucket (or the tensor itself when it travels alone).
            assert t.untyped_storage().nbytes() <= max(bucket, nbytes(t))
            got.append((name, t.clone()))
        ch.close()
        tensors, sent_bytes, buckets = q.get(timeout=60)
    finally:
        p.join(timeout=60)
    want = named_tensors()
    assert [n for n, _ in got] == [n for n, _ in want] and tensors == len(want)
    for (_, a), (name, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert sent_bytes >= sum(nbytes(t) for _, t in want)
    assert buckets == (len(list(bucketize(iter(want), bucket))))
    assert p.exitcode == 0


def _failing_sender(port: int) -> None:
    def source():
        yield "a", torch.ones(3)
        yield "b", torch.zeros(2, dtype=torch.complex64)  # cannot be sent: the sync stops here

    ch = WeightChannel("127.0.0.1", port, 0, 2)
    try:
        send_weights(source(), ch, 64)  # one tensor per bucket: "a" is out before "b" fails
    except WeightSyncError:
        pass
    ch.close()


def test_a_failed_send_aborts_the_receivers_instead_of_hanging():
    ctx = mp.get_context("spawn")
    port = free_port()
    p = ctx.Process(target=_failing_sender, args=(port,))
    p.start()
    try:
        ch = WeightChannel("127.0.0.1", port, 1, 2, timeout_s=120)
        got = []
        with pytest.raises(WeightSyncError, match="rank 0 aborted the sync"):
            for name, _ in receive_weights(ch):
                got.append(name)
        ch.close()
    finally:
        p.join(timeout=60)
    assert got == ["a"] and p.exitcode == 0


def test_unknown_dtype_is_named():
    ch = WeightChannel("127.0.0.1", free_port(), 0, 1)  # a group of one: packing errors show without a peer
    try:
        with pytest.raises(WeightSyncError, match="tensor c: dtype torch.complex64"):
            send_weights(iter([("c", torch.zeros(2, dtype=torch.complex64))]), ch, BUCKET)
    finally:
        ch.close()


def test_channel_errors_name_the_address():
    port = free_port()
    with pytest.raises(WeightSyncError, match=f"127.0.0.1:{port} as rank 1 of 2"):
        WeightChannel("127.0.0.1", port, 1, 2, timeout_s=1.0)
    with pytest.raises(ValueError, match="backend"):
        WeightChannel("127.0.0.1", port, 0, 2, backend="mpi")
    with pytest.raises(ValueError, match="rank 2 is not in"):
        WeightChannel("127.0.0.1", port, 2, 2)
