"""Recorded transformer calls kept on disk: the teacher trajectories of a calibration at scale.

`record_states` appends each batched transformer call as one safetensors file (`call-NNNNNN`);
`finish` then writes `index.json` last, atomically, so a store is either complete or is cleared
and recorded again. Reading row i pages in only that call's slice, so 7,232 prompts x 28 steps of
FLUX.1-dev states cost disk, not RAM, and a resumed run skips the recording.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .checkpoint import _atomic_write

RECORDED = "calls"  # the store's directory inside a calibration work dir
INDEX = "index.json"


class RecordedCalls(Sequence):
    """A list-like view of recorded calls (`dict[str, Tensor]` per sample) stored in `directory`."""

    def __init__(self, directory: str | os.PathLike, open_files: int = 64) -> None:
        self.path = Path(directory)
        self._rows: list[tuple[int, int]] = []  # row -> (file number, row in file)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._open_files = open_files
        index = self.path / INDEX
        if index.is_file():
            try:
                sizes = json.loads(index.read_text())["sizes"]
                self._rows = [(f, j) for f, b in enumerate(sizes) for j in range(int(b))]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: garbage recorded-calls index; delete {self.path} to record again") from None
            self._sizes = [int(b) for b in sizes]
        else:  # absent or unfinished (a killed recording): start empty
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self._sizes = []

    @property
    def complete(self) -> bool:
        return (self.path / INDEX).is_file()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append one batched transformer call (its tensors split into samples on reading)."""
        if self.complete:
            raise CheckpointError(f"{self.path}: recording already finished")
        n = len(self._sizes)
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(flat, str(self.path / f"call-{n:06d}.safetensors"))
        b = tensors["hidden_states"].shape[0]
        self._sizes.append(b)
        self._rows.extend((n, j) for j in range(b))

    def finish(self) -> None:
        """Make the recording visible: the index names every call's batch size and is written last."""
        sizes = json.dumps({"sizes": self._sizes})
        _atomic_write(self.path / INDEX, lambda tmp: tmp.write_text(sizes))

    def __len__(self) -> int:
        return len(self._rows)

    def _open(self, n: int):
        h = self._handles.pop(n, None)
        if h is None:
            path = self.path / f"call-{n:06d}.safetensors"
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable recorded call ({e}); delete {self.path} to record again") from None
            if len(self._handles) >= self._open_files:
                self._handles.popitem(last=False)
        self._handles[n] = h
        return h

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n, j = self._rows[i]
        h = self._open(n)
        # position ids (`*_ids`) are one per call, not batched, as in the in-memory recording
        return {k: h.get_tensor(k) if k.endswith("_ids") else h.get_slice(k)[j : j + 1] for k in h.keys()}
