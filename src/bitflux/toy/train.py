"""Reproducible CPU trainer for the toy FLUX: the VAE first, then transformer + text encoders.

Flow matching as FLUX: x_t = (1 - s) x0 + s * noise, target = noise - x0, with s drawn
logit-normal and shifted by the scheduler's resolution-dependent `mu`. Every batch is a
function of (seed, step), so a resumed run continues exactly. Checkpoints are safetensors,
written to a temp file and renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..errors import ModelError, OutputExistsError
from .build import LATENT_CHANNELS, ToyConfig, build_pipeline
from .data import ToyData, make_data, make_vae_images, tokenize
from .variants import get_world
from .world import IMAGE_SIZE, TEXT_LENGTH, World

@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run; recorded in the output's bitflux_toy.json."""

    minutes: float = 58.0  # wall-clock budget for all phases
    seed: int = 0
    n_scenes: int = 60_000
    n_vae_images: int = 12_000  # recoloured uniformly: the codec sees every colour-shape pair
    decoder_steps: int = 400  # decoder-only refinement after the VAE (latent space unchanged)
    vae_fraction: float = 0.15  # share of the budget spent on the VAE
    vae_steps: int | None = 2000  # fixed step counts; None: fit the budget after a short benchmark
    steps: int | None = 12_000  # fixed so a run is the same on any machine; None: fit the budget
    vae_batch: int = 32
    batch: int = 64
    vae_lr: float = 1e-3
    lr: float = 8e-4
    cond_drop: float = 0.1  # empty-prompt rate, enables classifier-free guidance
    logit_mean: float = 0.0  # noise levels ~ sigmoid(N(logit_mean, 1)); > 0 trains layout (high noise) more
    partial_captions: float = 0.0  # share of coloured objects captioned "a <colour> object" (data.py)
    absolute_positions: float = 0.0  # share of scenes: one object at an edge, "a red circle to the left" (data.py)
    canonical_positions: float = 0.0  # share of relation scenes drawn at canonical far-apart cells (data.py)
    ema: float = 0.999
    ckpt_every_s: float = 300.0
    world: str = "default"  # toy-world variation (toy.variants.WORLDS): palette and held-out compositions


def _gen(seed: int, step: int, phase: int) -> torch.Generator:
    """The RNG of one step: batches depend only on (seed, step), so resuming is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_000_019 + step)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------- flow matching


def sample_sigmas(b: int, g: torch.Generator, image_seq_len: int, logit_mean: float = 0.0) -> torch.Tensor:
    """Logit-normal s in (0, 1), shifted like the scheduler's dynamic shift at this resolution.

    logit_mean > 0 favours high noise, where the layout (which object, where, how many) is decided;
    in the toy world the low-noise details (flat colours, sharp edges) are easy.
    """
    s = torch.sigmoid(torch.randn(b, generator=g) + logit_mean)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def flow_loss(pipe: FluxPipeline, z0: torch.Tensor, clip_ids, t5_ids, g: torch.Generator, logit_mean: float = 0.0) -> torch.Tensor:
    """Flow-matching MSE for normalised latents z0 (B, C, h, w); text encoded as FluxPipeline does."""
    b, c, h, w = z0.shape
    x0 = FluxPipeline._pack_latents(z0, b, c, h, w)  # (B, h/2*w/2, 4C)
    noise = torch.randn(x0.shape, generator=g)
    s = sample_sigmas(b, g, x0.shape[1], logit_mean)  # (B,)
    xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    pooled = pipe.text_encoder(clip_ids).pooler_output  # (B, D)
    enc = pipe.text_encoder_2(t5_ids)[0]  # (B, L, D)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)  # (hw/4, 3)
    txt_ids = torch.zeros(t5_ids.shape[1], 3)
    pred = pipe.transformer(
        hidden_states=xt,
        timestep=s,
        pooled_projections=pooled,
        encoder_hidden_states=enc,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return F.mse_loss(pred, noise - x0)


# ----------------------------------------------------------------------------- phases


def _bench_steps(step_fn, budget_s: float, warmup: int = 3, n: int = 10) -> int:
    """Run warmup + n steps, then return how many steps fit in the budget (timed on the last n)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        step_fn(i)
    t = time.perf_counter()
    for i in range(warmup, warmup + n):
        step_fn(i)
    per = (time.perf_counter() - t) / n
    return max(warmup + n, int((budget_s - (t - t0)) / per) + warmup)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: TrainConfig, budget_s: float) -> dict:
    """Reconstruction (MSE) + tiny KL on rendered scenes (N, 3, H, W) in [-1, 1]."""
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    n = images.shape[0]
    losses: list[float] = []

    def step(i: int) -> None:
        g = _gen(cfg.seed, i, 1)
        x = images[torch.randint(0, n, (cfg.vae_batch,), generator=g)]  # (B, 3, H, W)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    total = cfg.vae_steps or _bench_steps(step, budget_s)
    done = len(losses)
    bar = tqdm(range(done, total), desc="vae", initial=done, total=total, mininterval=10)
    for i in bar:
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(i, total, cfg.vae_lr)
        step(i)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return {"vae_steps": total, "vae_loss": sum(losses[-100:]) / len(losses[-100:])}


def refine_decoder(vae: AutoencoderKL, images: torch.Tensor, cfg: TrainConfig) -> dict:
    """Train only the decoder further (encoder frozen, so the latent space the transformer learned
    is unchanged): sharper corners, so squares stop decoding as circles. Latents get a little
    extra noise so the decoder tolerates imperfect generated latents."""
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.vae_lr * 0.5)
    n = images.shape[0]
    losses: list[float] = []
    vae.decoder.train()
    for i in tqdm(range(cfg.decoder_steps), desc="decoder", mininterval=10):
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(i, cfg.decoder_steps, cfg.vae_lr * 0.5, warmup=20)
        g = _gen(cfg.seed, i, 3)
        x = images[torch.randint(0, n, (cfg.vae_batch,), generator=g)]  # (B, 3, H, W)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + (post.std + 0.05 * post.mean.std()) * torch.randn(post.mean.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.requires_grad_(False)
    vae.eval()
    return {"decoder_steps": cfg.decoder_steps, "decoder_loss": sum(losses[-100:]) / max(1, len(losses[-100:]))}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Posterior means (N, C, h, w); also sets the VAE's shift/scaling factors from their statistics."""
    vae.eval()
    lat = torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])
    shift, scale = lat.mean().item(), 1.0 / lat.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (lat - shift) * scale


class _Ema:
    """Exponential moving average of a list of parameters (warmed up)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def _trainable(pipe: FluxPipeline) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters of transformer, CLIP and T5 (tied weights once), in a fixed order."""
    out = []
    for comp in ("transformer", "text_encoder", "text_encoder_2"):
        out += [(f"{comp}.{k}", p) for k, p in getattr(pipe, comp).named_parameters()]
    return out


def _save_ckpt(path: Path, named, ema: _Ema, opt: torch.optim.Optimizer, state: dict) -> None:
    t = {f"p.{k}": p for k, p in named}
    t.update({f"ema.{k}": s for (k, _), s in zip(named, ema.shadow)})
    params = [p for _, p in named]
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            t[f"opt.{i}.exp_avg"], t[f"opt.{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            t[f"opt.{i}.step"] = st["step"].reshape(1)
    _save_tensors(t, path / "ckpt.safetensors")
    _write_json(state, path / "state.json")


def _load_ckpt(path: Path, named, ema: _Ema, opt: torch.optim.Optimizer) -> None:
    t = load_file(str(path / "ckpt.safetensors"))
    with torch.no_grad():
        for (k, p), s in zip(named, ema.shadow):
            p.copy_(t[f"p.{k}"])
            s.copy_(t[f"ema.{k}"])
    for i, (_, p) in enumerate(named):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {
                "step": t[f"opt.{i}.step"].reshape(()),
                "exp_avg": t[f"opt.{i}.exp_avg"],
                "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"],
            }


def train_flow(
    pipe: FluxPipeline, z: torch.Tensor, data: ToyData, cfg: TrainConfig, budget_s: float, work: Path, extend_to: int | None = None
) -> dict:
    """Train transformer + text encoders on cached latents z (N, C, h, w).

    extend_to: continue a checkpointed run to this many steps; the cosine schedule is re-planned
    for the new total from the current step on (a warm restart: the learning rate rises again)."""
    named = _trainable(pipe)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = _Ema(params, cfg.ema)
    state = {"step": 0, "total": cfg.steps, "losses": []}
    if (work / "state.json").exists():
        state = json.loads((work / "state.json").read_text())
        _load_ckpt(work, named, ema, opt)
    if extend_to is not None:
        if not state["step"]:
            raise ModelError(f"nothing to extend: {work} has no transformer checkpoint")
        if extend_to <= state["step"]:
            raise ModelError(f"--extend-to {extend_to} is not past the {state['step']} steps already trained")
        state.setdefault("extended_from", []).append(state["total"])
        state["total"] = extend_to
    empty_c, empty_t = tokenize(pipe.tokenizer, pipe.tokenizer_2, [""])
    n = z.shape[0]

    def step(i: int) -> None:
        g = _gen(cfg.seed, i, 2)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        c_ids, t_ids = data.clip_ids[idx].clone(), data.t5_ids[idx].clone()
        drop = torch.rand(cfg.batch, generator=g) < cfg.cond_drop
        c_ids[drop], t_ids[drop] = empty_c[0], empty_t[0]
        loss = flow_loss(pipe, z[idx], c_ids, t_ids, g, cfg.logit_mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(i)
        state["losses"].append(round(loss.item(), 5))
        state["step"] = i + 1

    if state["total"] is None:  # benchmark a few steps, then fix the step count for this run
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(0, 10_000, cfg.lr)
        state["total"] = _bench_steps(step, budget_s)
    total = state["total"]
    last = time.monotonic()
    deadline = last + budget_s * 1.2  # never overrun the budget by more than 20%
    bar = tqdm(range(state["step"], total), desc="flux", initial=state["step"], total=total, mininterval=10)
    for i in bar:
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(i, total, cfg.lr)
        step(i)
        if i % 25 == 0:
            bar.set_postfix(loss=f"{sum(state['losses'][-100:]) / len(state['losses'][-100:]):.4f}")
        if time.monotonic() > deadline:
            state["stopped_early"] = True
            break
        if time.monotonic() - last > cfg.ckpt_every_s:
            _save_ckpt(work, named, ema, opt, state)
            last = time.monotonic()
    _save_ckpt(work, named, ema, opt, state)
    ema.copy_to_params()
    return {"steps": state["step"], "planned_steps": total, "extended_from": state.get("extended_from", []), "final_loss": sum(state["losses"][-200:]) / max(1, len(state["losses"][-200:]))}


# ----------------------------------------------------------------------------- entry point


def save_refined_decoder(vae: AutoencoderKL, cfg: TrainConfig, work: Path) -> dict:
    """Run refine_decoder (depends only on the VAE phase, the seed and the world) and save it under work/."""
    info = refine_decoder(vae, make_vae_images(cfg.n_vae_images, cfg.seed, get_world(cfg.world)), cfg)
    tmp = work / "vae_refined.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    os.replace(tmp, work / "vae_refined")
    _write_json(info, work / "decoder_info.json")
    return info


def _model_config(work: Path, model_cfg: ToyConfig, resume: bool) -> ToyConfig:
    """Record the model sizes in work/model.json; a resumed run must ask for the same sizes."""
    path = work / "model.json"
    asked = asdict(model_cfg)
    asked["vae_channels"] = list(asked["vae_channels"])
    if resume and path.exists():
        stored = json.loads(path.read_text())
        if stored != asked:
            diff = ", ".join(f"{k}={stored.get(k)!r}" for k in asked if stored.get(k) != asked[k])
            raise ModelError(f"{work} was started with other model sizes ({diff}); pass the same options to resume")
    else:
        _write_json(asked, path)
    return model_cfg


def _check_world(work: Path, world: World, resume: bool) -> None:
    """Record the world in work/world.json; a resumed run must ask for the same (none recorded: default)."""
    path = work / "world.json"
    if resume:
        stored = json.loads(path.read_text())["name"] if path.exists() else "default"
        if stored != world.name:
            raise ModelError(f"{work} was started with --world {stored}; pass the same to resume")
    _write_json({"name": world.name}, path)


def train(
    out: Path | str, cfg: TrainConfig = TrainConfig(), resume: bool = False, model_cfg: ToyConfig | None = None,
    extend_to: int | None = None,
) -> Path:
    """Train the toy pipeline and save it (save_pretrained) to `out`; checkpoints go to `out`.work/.

    extend_to (with resume): train a checkpointed run on to this many transformer steps."""
    out = Path(out)
    work = out.with_name(out.name + ".work")
    world = get_world(cfg.world)
    if out.exists():
        raise OutputExistsError(f"{out} exists; bitflux never overwrites")
    if work.exists() and not resume:
        raise OutputExistsError(f"{work} exists; pass --resume to continue that run")
    if resume and not work.exists():
        raise ModelError(f"nothing to resume: {work} does not exist")
    if extend_to is not None and not resume:
        raise ModelError("extending a run continues its checkpoints: pass --resume too")
    if model_cfg is not None and cfg.partial_captions > 0 and not model_cfg.generic_words:
        raise ModelError("partial captions need a vocabulary with generic words: ToyConfig(generic_words=True)")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    budget = cfg.minutes * 60.0

    model_cfg = _model_config(work, model_cfg or ToyConfig(generic_words=cfg.partial_captions > 0), resume)
    _check_world(work, world, resume)
    pipe = build_pipeline(cfg.seed, model_cfg, world)
    z = None
    data = make_data(
        cfg.n_scenes, cfg.seed, pipe.tokenizer, pipe.tokenizer_2, cfg.partial_captions, cfg.absolute_positions, cfg.canonical_positions,
        world=world,
    )
    info: dict = {"config": asdict(cfg), "model": asdict(model_cfg), "image_size": IMAGE_SIZE, "latent_channels": LATENT_CHANNELS, "max_sequence_length": TEXT_LENGTH}
    info["world"] = world.record()  # toy.variants.world_of reads it: eval and calibration use the same world
    if (work / "vae" / "config.json").exists():
        pipe.vae = AutoencoderKL.from_pretrained(work / "vae")
        info.update(json.loads((work / "vae_info.json").read_text()))
    else:
        pipe.vae.train()
        info.update(train_vae(pipe.vae, make_vae_images(cfg.n_vae_images, cfg.seed, world), cfg, budget * cfg.vae_fraction - (time.monotonic() - t0)))
        z = encode_latents(pipe.vae, data.images)
        tmp = work / "vae.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.vae.save_pretrained(tmp)
        os.replace(tmp, work / "vae")
        _write_json({k: info[k] for k in ("vae_steps", "vae_loss")}, work / "vae_info.json")
    pipe.vae.requires_grad_(False)
    if z is None:
        z = encode_latents(pipe.vae, data.images)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train()
    reserve = 0.6 * cfg.decoder_steps  # seconds kept for the decoder refinement that follows
    info.update(train_flow(pipe, z, data, cfg, budget - reserve - (time.monotonic() - t0), work, extend_to))
    refined = work / "vae_refined"
    if (refined / "config.json").exists():
        pipe.vae = AutoencoderKL.from_pretrained(refined)
        info.update(json.loads((work / "decoder_info.json").read_text()))
    elif cfg.decoder_steps > 0:
        info.update(save_refined_decoder(pipe.vae, cfg, work))
    info["train_seconds"] = round(time.monotonic() - t0, 1)

    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    _write_json(info, tmp / "bitflux_toy.json")
    os.replace(tmp, out)
    return out
