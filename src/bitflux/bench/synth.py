"""Random-weight FLUX transformers with real configs, written to disk without ever holding them.

Real *shapes* are free: FLUX.1-dev's exact config at any depth, random bf16 weights, in the
hub's sharded diffusers layout (`diffusion_pytorch_model-0000i-of-0000n.safetensors` + index) or
as Black Forest Labs' single file. Each shard is streamed: the safetensors header is computed
from shapes alone, then tensors are generated and written one at a time, so peak memory is one
tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..archs import FLUX_DEV_CONFIG
from ..bfl import names as bfl_names
from ..bfl import swap

WEIGHTS = "diffusion_pytorch_model"
HUB_SHARD_BYTES = 10 * 1000**3  # the hub's FLUX.1-dev transformer shards are <= 10 GB
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def flux_dev_config(num_layers: int = 19, num_single_layers: int = 38) -> dict:
    """FLUX.1-dev's transformer config.json, at the given depth (19 + 38 is the real model)."""
    return {"_class_name": "FluxTransformer2DModel", **FLUX_DEV_CONFIG, "num_layers": num_layers, "num_single_layers": num_single_layers}


def _meta_model(config: dict) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(cfg)


def tensor_specs(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of the model `config` describes (diffusers names)."""
    return {k: (tuple(v.shape), dtype) for k, v in _meta_model(config).state_dict().items()}


def _random(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A deterministic random tensor for `name`: weights ~ N(0, 1/fan_in), biases and norms small."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name)) % 2**63)
    if len(shape) >= 2:
        std = 1.0 / math.sqrt(shape[-1])
        return (torch.randn(shape, generator=g) * std).to(dtype)
    if name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def flux_inputs(config, tokens: int, text: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Deterministic forward() kwargs for a FLUX transformer with `config`: one image of `tokens`
    patches and `text` T5 tokens (the shapes of one denoising step)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )
    if config.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5], dtype=dtype)
    return kw


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], tensors: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from `specs` (header first) and tensors yielded in `specs` order.

    Layout (the safetensors spec): u64 little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for (name, t), want in zip(tensors, specs):
                if name != want or tuple(t.shape) != specs[name][0]:
                    raise ValueError(f"tensor stream out of order: got {name}, expected {want}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(blob) + offset


def _shard_plan(specs: dict, shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_random_flux(
    out_dir: str | os.PathLike,
    *,
    num_layers: int = 19,
    num_single_layers: int = 38,
    seed: int = 0,
    shard_bytes: int = HUB_SHARD_BYTES,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
) -> Path:
    """Write a random-weight FLUX.1-dev-config transformer directory (config.json + shards + index)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    config = flux_dev_config(num_layers, num_single_layers)
    specs = tensor_specs(config, dtype)
    plan = _shard_plan(specs, shard_bytes)
    bar = tqdm(total=sum(math.prod(s) for s, _ in specs.values()), unit="param", unit_scale=True, desc="write", disable=not progress)
    weight_map, total = {}, 0
    for i, names in enumerate(plan, 1):
        fname = f"{WEIGHTS}.safetensors" if len(plan) == 1 else f"{WEIGHTS}-{i:05d}-of-{len(plan):05d}.safetensors"
        sub = {n: specs[n] for n in names}

        def stream(sub=sub):
            for n, (shape, dt) in sub.items():
                yield n, _random(n, shape, dt, seed)
                bar.update(math.prod(shape))

        total += write_safetensors(out / fname, sub, stream())
        weight_map.update({n: fname for n in names})
    bar.close()
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s, _ in specs.values())}, "weight_map": weight_map}
        (out / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_random_flux_pipeline(out_dir: str | os.PathLike, **kwargs) -> Path:
    """A pipeline-shaped directory (model_index.json + transformer/) around `write_random_flux`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    write_random_flux(out / "transformer", **kwargs)
    (out / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}) + "\n")
    return out


# ------------------------------------------------------------------ Black Forest Labs' single file
def to_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers FLUX state dict in Black Forest Labs' one-file naming (fused qkv, linear1/2)."""
    names = bfl_names(config["num_layers"], config["num_single_layers"], config.get("guidance_embeds", False))
    out = {bfl: torch.cat([state[d] for d in parts], dim=0) for bfl, parts in names.items() if parts[0] in state}
    for p in ("weight", "bias"):
        key = f"final_layer.adaLN_modulation.1.{p}"
        if key in out:
            out[key] = swap(out[key])
    return out


def write_random_flux_single_file(path: str | os.PathLike, *, num_layers: int = 19, num_single_layers: int = 38, seed: int = 0, progress: bool = False) -> Path:
    """The same random model as `write_random_flux`, as one BFL-layout .safetensors file, streamed."""
    from tqdm.auto import tqdm

    path = Path(path)
    if path.exists():
        raise FileExistsError(path)
    config = flux_dev_config(num_layers, num_single_layers)
    specs = tensor_specs(config)
    names = bfl_names(num_layers, num_single_layers, config["guidance_embeds"])
    bfl_specs = {}
    for bfl in sorted(names):
        parts = names[bfl]
        shapes = [specs[d][0] for d in parts]
        bfl_specs[bfl] = ((sum(s[0] for s in shapes), *shapes[0][1:]), torch.bfloat16)
    bar = tqdm(total=len(bfl_specs), desc="write", disable=not progress)

    def stream():
        for bfl in bfl_specs:
            t = torch.cat([_random(d, specs[d][0], torch.bfloat16, seed) for d in names[bfl]], dim=0)
            yield bfl, (swap(t) if bfl.startswith("final_layer.adaLN") else t)
            bar.update()

    write_safetensors(path, bfl_specs, stream())
    bar.close()
    return path
