"""A disk-backed pool of activations: the block inputs/targets block-wise calibration carries along.

Each tensor is a memory-mapped raw file (`torch.from_file`, shared), so a pool of N states costs
disk, not RAM: only the rows a batch indexes are paged in. A tensor is written under a temporary
name and renamed when complete (`finish`), so a killed run never mistakes a half-written stream
for a finished one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class DiskPool:
    """Named memory-mapped tensors in one directory (`<work>/pool/`)."""

    def __init__(self, directory: str | os.PathLike, clean: bool = True) -> None:
        self.path = Path(directory)
        self.path.mkdir(parents=True, exist_ok=True)
        for p in self.path.glob(".*.tmp") if clean else ():  # streams a killed run did not finish
            p.unlink(missing_ok=True)

    def _files(self, name: str) -> tuple[Path, Path]:
        return self.path / f"{name}.bin", self.path / f"{name}.json"

    def exists(self, name: str) -> bool:
        return all(p.exists() for p in self._files(name))

    def create(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new zero tensor backed by a temporary file; call `finish(name)` once it is filled."""
        tmp = self.path / f".{name}.bin.tmp"
        n = math.prod(shape)
        with open(tmp, "wb") as f:
            f.truncate(n * torch.empty((), dtype=dtype).element_size())
        t = torch.from_file(str(tmp), shared=True, size=n, dtype=dtype).view(shape)
        (self.path / f".{name}.json.tmp").write_text(json.dumps({"shape": list(shape), "dtype": str(dtype)}))
        return t

    def finish(self, name: str) -> None:
        """Make a filled tensor visible: flush it, then rename data and header (header last)."""
        data, head = self._files(name)
        with open(self.path / f".{name}.bin.tmp", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.path / f".{name}.bin.tmp", data)
        os.replace(self.path / f".{name}.json.tmp", head)

    def open(self, name: str) -> torch.Tensor:
        """A finished tensor, memory-mapped read-write."""
        data, head = self._files(name)
        meta = json.loads(head.read_text())
        shape, dtype = tuple(meta["shape"]), _DTYPES[meta["dtype"]]
        return torch.from_file(str(data), shared=True, size=math.prod(shape), dtype=dtype).view(shape)

    def delete(self, name: str) -> None:
        for p in reversed(self._files(name)):  # header first: a half-deleted tensor is not "finished"
            p.unlink(missing_ok=True)
