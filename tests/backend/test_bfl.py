"""BFL single-file layout: bad files are refused in one line before anything is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bitflux.bfl import free_space_for, names, to_diffusers_dir
from bitflux.errors import ModelError


def _file(path, drop: str | None = None, extra: str | None = None):
    table = names(1, 1, guidance=False)
    tensors = {k: torch.zeros(1) for k in table if k != drop}
    if extra:
        tensors[extra] = torch.zeros(1)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("drop, extra, match", [
    ("single_blocks.0.linear1.weight", None, "lacks tensor single_blocks.0.linear1.weight"),
    (None, "double_blocks.0.lora.weight", "not part of FLUX's single-file layout"),
])
def test_incomplete_or_foreign_files_are_one_line(tmp_path, drop, extra, match):
    f = _file(tmp_path / "f.safetensors", drop, extra)
    with pytest.raises(ModelError, match=match):
        to_diffusers_dir(f, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_flux_file(tmp_path):
    save_file({"model.layers.0.weight": torch.zeros(1)}, str(tmp_path / "llm.safetensors"))
    with pytest.raises(ModelError, match="no double_blocks"):
        to_diffusers_dir(tmp_path / "llm.safetensors", tmp_path / "out")


def test_a_fused_tensor_that_does_not_split_is_one_line(tmp_path):
    f = _file(tmp_path / "f.safetensors")  # every tensor 1 element: qkv cannot be 3 x 3072 rows
    with pytest.raises(ModelError, match="cannot be split"):
        to_diffusers_dir(f, tmp_path / "out")


def test_no_room_for_the_conversion_is_one_line(tmp_path, monkeypatch):
    import shutil

    f = _file(tmp_path / "f.safetensors")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(ModelError, match="needs .* GB free .*TMPDIR"):
        free_space_for(f, tmp_path)


def test_comfyui_prefixed_names_are_accepted(tmp_path):
    """`model.diffusion_model.` + BFL names: the same layout (here too small to split, the check after naming)."""
    table = names(1, 1, guidance=False)
    save_file({f"model.diffusion_model.{k}": torch.zeros(1) for k in table}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ModelError, match="cannot be split"):  # got past the name checks
        to_diffusers_dir(tmp_path / "c.safetensors", tmp_path / "out")
