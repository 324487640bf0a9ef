"""Shard files of the latent cache: standard safetensors files, written atomically, read one row at a time.

Why our own reader: ``safe_open`` memory-maps the file, and every page a training process touches through a
mapping counts in its resident memory until the kernel evicts it, so a process that reads a whole epoch of a
memory-mapped cache ends up "holding" the cache. Reading a row with ``os.pread`` at the offset the safetensors
header gives leaves the bytes in the page cache (shared, evictable, not in any process's RSS) and the process
holds only the rows of its current batches. The files stay plain safetensors: any loader reads them.

* :func:`write_shard` -- temp file, fsync, rename; returns the file's sha256 and size.
* :func:`file_sha256` -- streamed in 4 MiB blocks (flat memory for any file size).
* :class:`ShardReader` -- a header parsed once; :meth:`~ShardReader.row` reads ``tensor[i]``,
  :meth:`~ShardReader.tensor` a whole (small) tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import torch

from ..errors import DataError
from ..fsutil import fsync_file

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def file_sha256(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: str, tensors: dict, metadata: dict | None = None) -> dict:
    """Write ``tensors`` (contiguous CPU tensors) as one safetensors file; readers see the whole file or none.
    Returns ``{"sha256", "bytes"}`` of the file as written."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        fsync_file(tmp)
        digest = {"sha256": file_sha256(tmp), "bytes": os.path.getsize(tmp)}
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return digest


class ShardReader:
    """Row reads from one safetensors file through ``os.pread`` (see the module doc for why not mmap)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, n, 8))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            os.close(self.fd)
            raise DataError(f"latent cache shard {path} is not a safetensors file ({e}); delete the cache "
                            f"folder") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.base = 8 + n
        self.entries = header

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def shape(self, name: str) -> list:
        return list(self.entries[name]["shape"])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _read(self, name: str, offset: int, count: int, shape) -> torch.Tensor:
        e = self.entries[name]
        dtype = _DTYPES[e["dtype"]]
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        data = os.pread(self.fd, nbytes, self.base + e["data_offsets"][0] + offset) if nbytes else b""
        if len(data) != nbytes:
            raise DataError(f"latent cache shard {self.path} is shorter than its header says; delete it")
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self._read(name, 0, math.prod(shape), shape)

    def row(self, name: str, index: int, sub: int | None = None) -> torch.Tensor:
        """``tensor[index]`` (or ``tensor[index, sub]``) without reading anything else of the file."""
        shape = self.shape(name)
        if not 0 <= index < shape[0]:
            raise IndexError(f"row {index} of {name!r} ({shape[0]} rows) in {self.path}")
        inner = shape[1:]
        offset = index * math.prod(inner)
        if sub is not None:
            offset += sub * math.prod(inner[1:])
            inner = inner[1:]
        itemsize = torch.empty((), dtype=_DTYPES[self.entries[name]["dtype"]]).element_size()
        return self._read(name, offset * itemsize, math.prod(inner), inner)

    def span(self, name: str, start: int, stop: int) -> torch.Tensor:
        """``tensor[start:stop]`` of a 1-d tensor."""
        e = self.entries[name]
        itemsize = torch.empty((), dtype=_DTYPES[e["dtype"]]).element_size()
        return self._read(name, start * itemsize, stop - start, [stop - start])


__all__ = ["ShardReader", "file_sha256", "write_shard"]
