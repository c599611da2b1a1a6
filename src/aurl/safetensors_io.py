"""Safetensors files read without torch: the header checked in Python before any parser sees
the file (:func:`check_safetensors`, :func:`read_header`), and the tensors as numpy arrays
(:func:`read_arrays`), for the torch-free engines. :mod:`aurl.models.pretrained` loads models
through the same checks."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from aurl.errors import CheckpointError


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file before any parser sees it: a pickle
    (``torch.save``) begins with 0x80, a zip-format ``torch.save`` with ``PK``. A safetensors
    file begins with its header's length (8 bytes, little-endian) and then ``{``: that length's
    first byte may be 0x80 too (a 5,248-byte header), so ``{`` at byte 8 decides first."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return  # the header parser checks the length and every tensor next
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} holds a pickle (torch.save) payload, not safetensors: refusing to load it "
            "(pickles can run code); convert it with save_pretrained from a trusted session"
        )
    raise CheckpointError(f"{path} is not a safetensors file: re-save it with save_pretrained")


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors header, checked against the file's size.

    Raises:
        CheckpointError: truncated, damaged, or a tensor of an unknown dtype or whose bytes
            lie outside the file.
    """
    return _layout(path)[0]


def _layout(path: Path) -> tuple[dict, dict[str, tuple[int, int]], int]:
    """:func:`read_header`'s entries, each tensor's ``(start, end)`` among the data bytes, and
    where the data bytes begin."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: header of {n} bytes in a file of {size}: truncated or damaged, "
                "re-save it with save_pretrained"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged safetensors header ({e})") from None
    data_bytes = size - 8 - n
    out, offsets = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: damaged header entry for {name!r}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: {name} has the unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if (
            min(shape, default=0) < 0
            or not 0 <= start <= end <= data_bytes
            or end - start != nbytes
        ):
            raise CheckpointError(
                f"{path}: {name} ({dtype} {list(shape)}) does not fit in the file's "
                f"{data_bytes} data bytes: truncated or damaged, re-save it with save_pretrained"
            )
        out[name], offsets[name] = (dtype, shape), (start, end)
    # the data indexed whole, in order, without holes or shared bytes (the format's own rule,
    # which the torch loader enforces): a tensor given another's bytes was read as it
    at = 0
    for name, (start, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if start != at:
            raise CheckpointError(
                f"{path}: {name} starts at data byte {start}, not {at}: its tensors overlap or "
                "leave a gap (damaged), re-save it with save_pretrained"
            )
        at = end
    if at != data_bytes:
        raise CheckpointError(
            f"{path}: its tensors end at data byte {at} of {data_bytes}: damaged, re-save it "
            "with save_pretrained"
        )
    return out, offsets, 8 + n


NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


class Tensors(Mapping):
    """The tensors of a checked safetensors file by name, each read from the file when it is
    asked for (BF16 widened to float32): a file with more or larger tensors than its reader
    uses costs only the bytes that reader takes."""

    def __init__(self, path: Path, header: dict, offsets: dict[str, tuple[int, int]], base: int):
        self.path, self._header, self._offsets, self._base = path, header, offsets, base
        self._shapes = {name: shape for name, (_, shape) in header.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape = self._header[name]
        start, end = self._offsets[name]
        with self.path.open("rb") as f:
            f.seek(self._base + start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise CheckpointError(f"{self.path}: {name} is cut short: the file changed while read")
        if dtype == "BF16":
            bits = np.frombuffer(data, np.uint16).astype(np.uint32)
            return (bits << 16).view(np.float32).reshape(shape)
        return np.frombuffer(data, NUMPY_DTYPES[dtype], math.prod(shape)).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape, from the header (nothing read)."""
        return self._shapes


def read_arrays(path: str | Path) -> Tensors:
    """The tensors of the safetensors file at ``path`` as numpy arrays by name (read-only, each
    read when asked for: :class:`Tensors`), after :func:`check_safetensors` and
    :func:`read_header`.

    Raises:
        CheckpointError: not a safetensors file, or damaged (see :func:`read_header`).
    """
    path = Path(path)
    check_safetensors(path)
    return Tensors(path, *_layout(path))
