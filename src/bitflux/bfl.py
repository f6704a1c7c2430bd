"""Black Forest Labs' one-file FLUX layout (fused qkv, linear1/linear2) and its diffusers names.

`names` maps each BFL tensor to the diffusers tensors concatenated (dim 0) into it; `config_of`
derives the diffusers config from a file's tensor names (offline); `to_diffusers_dir` rewrites a
BFL file as a sharded diffusers transformer directory one output shard at a time, so quantising a
23.8 GB single file costs disk, not RAM (diffusers' own converter holds most of the file resident).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ModelError

WEIGHTS = "diffusion_pytorch_model"
PREFIX = "model.diffusion_model."  # ComfyUI-style files wrap the BFL names in this prefix
SHARD_BYTES = 256 * 1000**2  # output shards of the conversion: bounds the RAM it holds at once


def names(num_layers: int, num_single_layers: int, guidance: bool) -> dict[str, list[str]]:
    """BFL tensor name -> the diffusers tensors concatenated (dim 0) into it, in order."""
    m: dict[str, list[str]] = {}
    emb = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}
    pairs = (("in_layer", "linear_1"), ("out_layer", "linear_2"))
    emb.update({f"time_in.{a}": f"time_text_embed.timestep_embedder.{b}" for a, b in pairs})
    emb.update({f"vector_in.{a}": f"time_text_embed.text_embedder.{b}" for a, b in pairs})
    if guidance:
        emb.update({f"guidance_in.{a}": f"time_text_embed.guidance_embedder.{b}" for a, b in pairs})
    for bfl, d in emb.items():
        for p in ("weight", "bias"):
            m[f"{bfl}.{p}"] = [f"{d}.{p}"]
    for p in ("weight", "bias"):  # diffusers stores (scale, shift) where BFL has (shift, scale): see swap
        m[f"final_layer.adaLN_modulation.1.{p}"] = [f"norm_out.linear.{p}"]
    for i in range(num_layers):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for side, q, k, v, proj, mlp, mod, nq, nk in (
            ("img", "to_q", "to_k", "to_v", "to_out.0", "ff", "norm1", "norm_q", "norm_k"),
            ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context", "norm_added_q", "norm_added_k"),
        ):
            for p in ("weight", "bias"):
                m[f"{b}.{side}_attn.qkv.{p}"] = [f"{t}.attn.{q}.{p}", f"{t}.attn.{k}.{p}", f"{t}.attn.{v}.{p}"]
                m[f"{b}.{side}_attn.proj.{p}"] = [f"{t}.attn.{proj}.{p}"]
                m[f"{b}.{side}_mlp.0.{p}"] = [f"{t}.{mlp}.net.0.proj.{p}"]
                m[f"{b}.{side}_mlp.2.{p}"] = [f"{t}.{mlp}.net.2.{p}"]
                m[f"{b}.{side}_mod.lin.{p}"] = [f"{t}.{mod}.linear.{p}"]
            m[f"{b}.{side}_attn.norm.query_norm.scale"] = [f"{t}.attn.{nq}.weight"]
            m[f"{b}.{side}_attn.norm.key_norm.scale"] = [f"{t}.attn.{nk}.weight"]
    for i in range(num_single_layers):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for p in ("weight", "bias"):
            m[f"{b}.linear1.{p}"] = [f"{t}.attn.to_q.{p}", f"{t}.attn.to_k.{p}", f"{t}.attn.to_v.{p}", f"{t}.proj_mlp.{p}"]
            m[f"{b}.linear2.{p}"] = [f"{t}.proj_out.{p}"]
            m[f"{b}.modulation.lin.{p}"] = [f"{t}.norm.linear.{p}"]
        m[f"{b}.norm.query_norm.scale"] = [f"{t}.attn.norm_q.weight"]
        m[f"{b}.norm.key_norm.scale"] = [f"{t}.attn.norm_k.weight"]
    return m


def swap(t: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves along dim 0 (BFL's (shift, scale) <-> diffusers' (scale, shift))."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def config_of(path: Path) -> dict[str, Any]:
    """FLUX.1-dev's config.json at the depth and guidance a BFL single file's tensor names show."""
    from .tensorcheck import read_headers

    return _config_from({n.removeprefix(PREFIX) for n in read_headers([path])}, path)


def _config_from(found: set[str], path: Path) -> dict[str, Any]:
    from .archs import FLUX_DEV_CONFIG

    if not any(n.startswith("double_blocks.") for n in found):
        raise ModelError(f"{path}: not a FLUX transformer in Black Forest Labs' single-file layout (no double_blocks.*)")
    count = lambda p: len({n.split(".")[1] for n in found if n.startswith(p)})  # noqa: E731
    return {
        "_class_name": "FluxTransformer2DModel",
        **FLUX_DEV_CONFIG,
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "guidance_embeds": any(n.startswith("guidance_in.") for n in found),
    }


def _sizes(bfl: str, rows: int, parts: int, inner: int) -> list[int]:
    """Rows of each diffusers part of a fused BFL tensor (q, k, v of `inner` rows each, then the MLP)."""
    if parts == 1:
        return [rows]
    sizes = [inner] * 3 + ([rows - 3 * inner] if parts == 4 else [])
    if sum(sizes) != rows or min(sizes) <= 0:
        raise ModelError(f"{bfl}: {rows} rows cannot be split into {parts} parts of this config")
    return sizes


def _split(bfl: str, t: torch.Tensor, parts: int, inner: int) -> list[torch.Tensor]:
    if bfl.startswith("final_layer.adaLN"):
        return [swap(t)]
    return list(torch.split(t, _sizes(bfl, t.shape[0], parts, inner), dim=0))


def to_diffusers_dir(path: str | os.PathLike, out_dir: str | os.PathLike, *, shard_bytes: int = SHARD_BYTES,
                     progress: Callable[[int], None] | None = None) -> Path:
    """Rewrite the BFL single file `path` as a sharded diffusers transformer directory `out_dir`.

    At most one output shard (plus the fused tensor being split) is held at a time; the input is
    mapped only while that shard is read. `progress(bytes)` is called after each shard.
    """
    from .tensorcheck import read_headers

    path, out = Path(path), Path(out_dir)
    stored = read_headers([path])  # once: the config and the shard plan both come from it
    prefix = PREFIX if all(n.startswith(PREFIX) for n in stored) else ""
    headers = {n.removeprefix(prefix): h for n, h in stored.items()}
    config = _config_from(set(headers), path)
    table = names(config["num_layers"], config["num_single_layers"], config["guidance_embeds"])
    unknown = sorted(set(headers) - set(table))
    if unknown:
        raise ModelError(f"{path}: tensor {unknown[0]} is not part of FLUX's single-file layout")
    missing = sorted(set(table) - set(headers))
    if missing:
        raise ModelError(f"{path}: lacks tensor {missing[0]}")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    for bfl, parts in table.items():  # every fused tensor must split before anything is written
        _sizes(bfl, headers[bfl].shape[0] if headers[bfl].shape else 0, len(parts), inner)
    plan: list[list[str]] = [[]]
    size = 0
    for bfl in sorted(table):  # group the BFL tensors into output shards of about shard_bytes
        n = _nbytes(headers[bfl])
        if plan[-1] and size + n > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(bfl)
        size += n
    out.mkdir(parents=True)
    try:
        return _write(path, prefix, out, plan, table, inner, config, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never a half-written directory
        raise


def _write(path: Path, prefix: str, out: Path, plan: list[list[str]], table: dict[str, list[str]], inner: int,
           config: dict[str, Any], progress: Callable[[int], None] | None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(plan, 1):
        fname = f"{WEIGHTS}-{i:05d}-of-{len(plan):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:  # closed per shard: its mapped pages go
            for bfl in group:
                t = fh.get_tensor(prefix + bfl)
                for d, part in zip(table[bfl], _split(bfl, t, len(table[bfl]), inner)):
                    shard[d] = part.clone()  # own memory, not a view of the mapped file
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        total += nbytes
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
        if progress is not None:
            progress(nbytes)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _nbytes(h) -> int:
    size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(h.dtype, 4)
    for d in h.shape:
        size *= d
    return size


def free_space_for(path: Path, where: Path) -> None:
    """One line if `where` lacks room for a converted copy of the single file `path`."""
    need, free = path.stat().st_size, shutil.disk_usage(where).free
    if free < need * 1.05:
        raise ModelError(
            f"{path}: converting this single file needs {need / 1e9:.1f} GB free in {where} "
            f"({free / 1e9:.1f} GB free); set TMPDIR to a disk with room, or pass a diffusers directory"
        )
