"""Sequence packing for the student's forward (Megatron's "thd" layout: one row, many sequences).

Each sequence is prompt + response tokens. Sequences are laid end to end in one row; each may be
padded to a multiple of `pad_multiple` (context / sequence parallelism need it), and the row as a whole to a
multiple of `row_multiple` (FP8 GEMMs need it; the last sequence's padding takes the extra tokens). Per token t the
batch holds, in Megatron's convention (labels and mask aligned with the
logits at t):

    input_ids[t]      the token
    labels[t]         the next token of the same sequence (pad_id at a sequence's last token and on padding)
    loss_mask[t]      1.0 where labels[t] is a response token, else 0.0
    position_ids[t]   position inside its own sequence (restarts at 0 for every sequence)
    seq_index[t]      which sequence of this batch the token belongs to; -1 on padding

so the log-prob of response token j of sequence i sits at position offset_i + prompt_len_i - 1 + j.
`unpack_response` and `scatter_response` move per-response-token values (log-probs, advantages
per token) between that layout and per-sequence lists; `per_token` spreads per-sequence values
(advantages, 1/len weights for seq-mean aggregation) over the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from uniapl_megatron.data.report import DataError

# Per-rank token multiple of Transformer Engine's FP8 GEMMs, per recipe (Megatron's get_fp8_align_size; the
# blockwise recipe scales 128-row tiles). models.specs reads its recipe list from here.
FP8_TOKEN_MULTIPLE = {"none": 1, "delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 32}


def required_pad_multiple(tp_size: int = 1, cp_size: int = 1, sequence_parallel: bool = False) -> int:
    """The per-sequence length multiple Megatron needs: 2*cp for context parallelism (each sequence is
    cut into 2*cp chunks), times tp with sequence parallelism (the local tokens are split over tp)."""
    multiple = 2 * cp_size if cp_size > 1 else 1
    if sequence_parallel and tp_size > 1:
        multiple *= tp_size
    return multiple


def row_pad_multiple(
    tp_size: int = 1, cp_size: int = 1, sequence_parallel: bool = False, fp8_recipe: str = "none"
) -> int:
    """The packed row's length multiple: the per-sequence one times the FP8 GEMMs' token multiple (16; 32 for
    mxfp8, 128 for blockwise), so that every rank's share of the row is a multiple of it. The GEMMs see the
    row's tokens, not its sequences, so only the row needs it (NeMo-RL's rule too)."""
    if fp8_recipe not in FP8_TOKEN_MULTIPLE:
        raise ValueError(
            f"row_pad_multiple: unknown FP8 recipe {fp8_recipe!r}; expected one of {', '.join(FP8_TOKEN_MULTIPLE)}"
        )
    return required_pad_multiple(tp_size, cp_size, sequence_parallel) * FP8_TOKEN_MULTIPLE[fp8_recipe]


def aligned_length(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (a sequence's length in a packed row)."""
    return -(-n // multiple) * multiple


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] int64
    labels: torch.Tensor  # [1, T] int64
    loss_mask: torch.Tensor  # [1, T] float32
    position_ids: torch.Tensor  # [1, T] int64
    seq_index: torch.Tensor  # [T] int64, -1 on padding
    cu_seqlens: torch.Tensor  # [n+1] int32, cumulative real lengths
    cu_seqlens_padded: torch.Tensor  # [n+1] int32, where each sequence starts in the row
    seq_lens: list[int]  # real length of each sequence
    prompt_lens: list[int]
    seq_ids: list[int]  # the caller's index of each sequence (e.g. into the step's list)
    max_seqlen: int  # longest padded sequence

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        """Tokens in the row, padding included."""
        return int(self.input_ids.shape[1])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def is_filler(self) -> bool:
        """A batch with no sequences (a rank with fewer sequences than micro-batches): its loss is 0."""
        return not self.seq_lens

    def _offsets(self) -> list[int]:
        return self.cu_seqlens_padded[:-1].tolist() if self.seq_lens else []

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x[0] if x.dim() >= 2 and x.shape[0] == 1 else x

    def unpack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-token values ([T, ...] or [1, T, ...]) -> one tensor per sequence, padding dropped."""
        x = self._flat(x)
        return [x[o : o + n] for o, n in zip(self._offsets(), self.seq_lens)]

    def unpack_response(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Values at the label positions of the response tokens -> one tensor per sequence, of length
        len(response) (e.g. the log-probs of the sampled tokens, in sampling order)."""
        x = self._flat(x)
        return [x[o + p - 1 : o + n - 1] for o, n, p in zip(self._offsets(), self.seq_lens, self.prompt_lens)]

    def scatter_response(
        self, values: Sequence[Any], fill: float = 0.0, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """One value per response token of each sequence -> [1, T] at the label positions (fill elsewhere)."""
        if len(values) != self.num_seqs:
            raise ValueError(f"scatter_response: got values for {len(values)} sequences, the batch has {self.num_seqs}")
        out = torch.full((self.num_tokens,), fill, dtype=dtype, device=self.input_ids.device)
        for i, (o, n, p, v) in enumerate(zip(self._offsets(), self.seq_lens, self.prompt_lens, values)):
            v = torch.as_tensor(v, dtype=dtype, device=out.device)
            if v.shape != (n - p,):
                raise ValueError(
                    f"scatter_response: sequence {i} has {n - p} response tokens, got values of shape {tuple(v.shape)}"
                )
            out[o + p - 1 : o + n - 1] = v
        return out.unsqueeze(0)

    def per_token(self, per_seq: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """One value per sequence ([n]) -> [1, T], each token getting its sequence's value (fill on padding)."""
        per_seq = torch.as_tensor(per_seq, device=self.input_ids.device)
        if per_seq.shape[:1] != (self.num_seqs,):
            raise ValueError(f"per_token: expected {self.num_seqs} values, got shape {tuple(per_seq.shape)}")
        if self.is_filler:
            return torch.full((1, self.num_tokens), fill, dtype=per_seq.dtype, device=per_seq.device)
        real = self.seq_index >= 0
        out = per_seq[self.seq_index.clamp(min=0)]
        return torch.where(real, out, torch.full_like(out, fill)).unsqueeze(0)

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)

    def to_packed_seq_params(self) -> Any:
        """Megatron-core's PackedSeqParams (qkv_format "thd") for this row."""
        from megatron.core.packed_seq_params import PackedSeqParams

        padded = self.cu_seqlens_padded if not torch.equal(self.cu_seqlens, self.cu_seqlens_padded) else None
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def _check_pack_args(n_seqs: int, n_prompt_lens: int, pad_multiple: int, row_multiple: int) -> None:
    """Refuse mismatched lengths and non-positive multiples before anything is laid out."""
    if n_seqs != n_prompt_lens:
        raise ValueError(f"pack_sequences: {n_seqs} sequences but {n_prompt_lens} prompt lengths")
    if pad_multiple < 1 or row_multiple < 1:
        raise ValueError(
            f"pack_sequences: pad_multiple and row_multiple must be >= 1, got {pad_multiple}, {row_multiple}"
        )


def _filler_batch(t: int, pad_id: int) -> PackedBatch:
    """A row of `t` pad tokens as one pseudo-sequence with no loss, for a rank with no sequences."""
    cu = torch.tensor([0, t], dtype=torch.int32)
    return PackedBatch(
        input_ids=torch.full((1, t), pad_id, dtype=torch.int64),
        labels=torch.full((1, t), pad_id, dtype=torch.int64),
        loss_mask=torch.zeros(1, t),
        position_ids=torch.arange(t).unsqueeze(0),
        seq_index=torch.full((t,), -1, dtype=torch.int64),
        cu_seqlens=cu,
        cu_seqlens_padded=cu.clone(),
        seq_lens=[],
        prompt_lens=[],
        seq_ids=[],
        max_seqlen=t,
    )


def pack_sequences(
    token_ids: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    *,
    pad_multiple: int = 1,
    pad_id: int = 0,
    seq_ids: Sequence[int] | None = None,
    row_multiple: int = 1,
) -> PackedBatch:
    """Lay sequences (prompt + response ids, `prompt_lens[i]` of them the prompt) in one packed row.

    Each sequence is padded to a multiple of `pad_multiple`, the row to a multiple of
    lcm(pad_multiple, row_multiple): the last sequence's padding grows by what the row lacks.
    An empty list gives a filler row of that many pad tokens with no loss, so every data-parallel
    rank can run the same number of micro-batches.
    """
    _check_pack_args(len(token_ids), len(prompt_lens), pad_multiple, row_multiple)
    row_multiple = math.lcm(pad_multiple, row_multiple)
    seqs = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_ids]
    lens = [len(s) for s in seqs]
    for i, (n, p) in enumerate(zip(lens, prompt_lens)):
        if not 1 <= p <= n:
            raise DataError(f"sequence {i}: prompt length {p} must be between 1 and the sequence length {n}")
    if not seqs:
        return _filler_batch(row_multiple, pad_id)
    padded = [aligned_length(n, pad_multiple) for n in lens]
    padded[-1] += aligned_length(sum(padded), row_multiple) - sum(padded)
    offsets = np.concatenate([[0], np.cumsum(padded)])
    total = int(offsets[-1])
    input_ids = np.full(total, pad_id, dtype=np.int64)
    labels = np.full(total, pad_id, dtype=np.int64)
    loss_mask = np.zeros(total, dtype=np.float32)
    position_ids = np.zeros(total, dtype=np.int64)
    seq_index = np.full(total, -1, dtype=np.int64)
    for i, (s, n, p, o, pl) in enumerate(zip(seqs, lens, prompt_lens, offsets, padded)):
        input_ids[o : o + n] = s
        labels[o : o + n - 1] = s[1:]
        loss_mask[o + p - 1 : o + n - 1] = 1.0
        position_ids[o : o + pl] = np.arange(pl)  # padding keeps counting; it is never a target
        seq_index[o : o + n] = i
    ids = list(range(len(seqs))) if seq_ids is None else [int(x) for x in seq_ids]
    if len(ids) != len(seqs):
        raise ValueError(f"pack_sequences: {len(ids)} seq_ids for {len(seqs)} sequences")
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids).unsqueeze(0),
        labels=torch.from_numpy(labels).unsqueeze(0),
        loss_mask=torch.from_numpy(loss_mask).unsqueeze(0),
        position_ids=torch.from_numpy(position_ids).unsqueeze(0),
        seq_index=torch.from_numpy(seq_index),
        cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(offsets, dtype=torch.int32),
        seq_lens=lens,
        prompt_lens=[int(p) for p in prompt_lens],
        seq_ids=ids,
        max_seqlen=max(padded),
    )
