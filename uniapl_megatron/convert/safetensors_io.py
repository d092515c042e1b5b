"""Hugging Face safetensors folders: a lazy reader and a streaming writer. No pickle, ever."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from .params import ConversionError

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsFolder:
    """Tensors of a HF model folder (one file or sharded with an index), read one at a time.

    Each read opens and closes its file, so the memory map is dropped again: reading a whole checkpoint
    never keeps it resident next to the model it is loaded into.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{folder}: not a folder")
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            self.weight_map = {k: self.folder / v for k, v in weight_map.items()}
            for f in sorted(set(self.weight_map.values())):
                if not f.is_file():
                    raise ConversionError(f"{index}: names shard {f.name}, which is missing")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                pickled = [p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
                hint = (
                    (
                        f" (found {pickled}: pickle-based weights are not loaded; convert them to safetensors "
                        "with a tool you trust)"
                    )
                    if pickled
                    else ""
                )
                raise ConversionError(f"{folder}: no *.safetensors files{hint}")
            self.weight_map = {}
            for f in files:
                for k in self._keys(f):
                    self.weight_map[k] = f

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.folder}: tensor {name!r} is missing")
        with safe_open(str(self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers alone."""
        out: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(self.weight_map.values())):
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    out[k] = tuple(f.get_slice(k).get_shape())
        return out

    def total_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in set(self.weight_map.values()))


class StreamingSafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in any order and from any thread: the header is laid
    out from the plan (names, shapes, dtypes) first, then each tensor goes to its planned offset, so at
    most one tensor is in memory at a time. The format is the library's own (8-byte little-endian header
    size, JSON header, raw data); the safetensors package has no streaming writer."""

    def __init__(
        self,
        path: str | Path,
        plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self.slots: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        offset = 0
        for name, shape, dtype in plan:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.slots[name] = (tuple(shape), dtype, offset)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(blob)) + blob)
        self._data_start = 8 + len(blob)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None or name in self._written or (tuple(tensor.shape), tensor.dtype) != slot[:2]:
            raise RuntimeError(
                f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{slot[:2] if slot else 'nothing'}{' (already written)' if name in self._written else ''}"
            )
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        pos, done = self._data_start + slot[2], 0
        while done < len(data):  # pwrite may write less than asked
            done += os.pwrite(self._fd, data[done:], pos + done)
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self.slots if n not in self._written]
        if not missing:
            os.fsync(self._fd)
        os.close(self._fd)
        if missing:
            raise RuntimeError(f"{self.path}: closed before writing {missing[:5]}...")
