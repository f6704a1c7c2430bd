"""Measured memory of block-wise calibration for one real-size FLUX.1-dev block, and the 12B plan.

What: builds ONE FLUX.1-dev double block and ONE single block (dim 3072, 24 heads x 128, random
weights, no download), wraps each in the calibration student (`build_student`, fp32 latents +
scales), and measures on CPU
  * state bytes, counted tensor by tensor: latent weights, scales, frozen fp32 tensors, gradients
    and Adam moments after a real step;
  * activation memory of one training step (batch 1) at small token counts, as peak-RSS growth
    (/proc/self/status VmHWM, reset through /proc/self/clear_refs) minus the gradients, with and
    without `grad_checkpoint` (children of the block checkpointed, see bitflux/calibrate/blockwise.py);
  * the exact bytes autograd saves for backward (saved_tensors_hooks, unique storages) at two
    token counts, whose difference gives the per-token activation rate;
  * the teacher block's no-grad forward peak, and wall time per step (1 thread, information only).
Each block kind is measured in a fresh subprocess started with MALLOC_MMAP_THRESHOLD_=65536, so
freed tensors go back to the OS and RSS tracks live tensors.
Activations are extrapolated LINEARLY to 4096 image + 512 text tokens (FLUX.1-dev at 1024x1024):
measured step activation + saved bytes/token x extra tokens. Linear because the fused SDPA
(CPU flash kernel here, flash/efficient attention on the GPU) keeps no S x S matrix (an earlier
3-point RSS fit, 160/320/640 tokens, agreed: 0.268 vs 0.272 MB/token saved for the double block).
The token-independent part (each ternary Linear's materialised fp32 weight q and s*q, weight-grad
temporaries) is contained in the measured step.

Then it derives the per-GPU memory of block-wise calibration of FLUX.1-dev, the joint-mode
requirement, and a FLOP-based GPU-hour estimate for 7,232 prompts (assumptions printed).
Writes bench/results/calib_memory.json. Runs in ~3 min on a busy 2-core box (two processes in parallel), < 7 GB RAM each.

    python research/calib_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DIM, HEADS, HEAD_DIM, MLP = 3072, 24, 128, 4 * 3072
N_DOUBLE, N_SINGLE = 19, 38
AXES = (16, 56, 56)
TOKENS = ((64, 16), (192, 48))  # (image, text) token counts: training step at the first, saved bytes at both
TARGET = (4096, 512)  # 1024x1024: 64x64 packed latents, T5 max_sequence_length 512
GB = 1e9
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "calib_memory.json"


# ----------------------------------------------------------------------------------- measurement
def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure(kind: str) -> dict[str, Any]:
    """Measure one block kind ('double' | 'single') in this process."""
    import torch
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from torch import nn

    from bitflux.calibrate import CalibConfig
    from bitflux.calibrate.blockwise import _Checkpointed, checkpoint_children
    from bitflux.calibrate.losses import block_loss
    from bitflux.calibrate.student import FakeTernaryLinear, build_student

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    holder = nn.Module()  # named like FluxTransformer2DModel so the "flux" policy selects the block
    blk = (FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock)(DIM, HEADS, HEAD_DIM)
    holder.transformer_blocks = nn.ModuleList([blk] if kind == "double" else [])
    holder.single_transformer_blocks = nn.ModuleList([] if kind == "double" else [blk])
    holder.eval()
    pos = FluxPosEmbed(theta=10000, axes_dim=list(AXES))

    def inputs(n_img: int, n_txt: int, seed: int = 1) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        side = int(n_img**0.5)
        img_ids = torch.zeros(n_img, 3)
        img_ids[:, 1] = torch.arange(n_img) // side
        img_ids[:, 2] = torch.arange(n_img) % side
        ids = torch.cat([torch.zeros(n_txt, 3), img_ids])
        return dict(
            hidden_states=torch.randn(1, n_img, DIM, generator=g),  # (1, S_img, C)
            encoder_hidden_states=torch.randn(1, n_txt, DIM, generator=g),  # (1, S_txt, C)
            temb=torch.randn(1, DIM, generator=g),  # (1, C)
            image_rotary_emb=pos(ids),  # (cos, sin), each (S_txt + S_img, 128)
        )

    # teacher targets for every token count (fp32 here; bf16 on the GPU), and its no-grad peak
    targets, teacher_fwd = {}, {}
    for n_img, n_txt in TOKENS[:1]:
        kw = inputs(n_img, n_txt)
        base = _reset_peak()
        with torch.no_grad():
            targets[(n_img, n_txt)] = blk(**kw)
        teacher_fwd[str(n_img + n_txt)] = _status("VmHWM") - base
    teacher_param_bytes = _nbytes(blk.parameters())
    n_linear = sum(m.weight.numel() for m in blk.modules() if isinstance(m, nn.Linear))
    n_mod = sum(m.weight.numel() for n, m in blk.named_modules() if isinstance(m, nn.Linear) and n.startswith("norm"))

    student = build_student(holder, CalibConfig(init="absmean"))  # init does not change memory
    del holder, blk
    gc.collect()
    sblk = (student.transformer_blocks if kind == "double" else student.single_transformer_blocks)[0]
    fakes = [m for m in sblk.modules() if isinstance(m, FakeTernaryLinear)]
    params = [p for p in sblk.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    build_s = time.perf_counter() - t0

    def step(n_img: int, n_txt: int, update: bool) -> tuple[int, int, float]:
        """(peak growth during forward+backward, peak growth during opt.step, seconds) of one step."""
        kw, tgt = inputs(n_img, n_txt), targets[(n_img, n_txt)]
        opt.zero_grad(set_to_none=True)
        base = _reset_peak()
        t = time.perf_counter()
        block_loss(sblk(**kw), tgt).backward()
        fwd_bwd = _status("VmHWM") - base
        base = _reset_peak()
        if update:
            opt.step()  # first step: allocates the Adam moments
        return fwd_bwd, _status("VmHWM") - base, time.perf_counter() - t

    def saved(n_img: int, n_txt: int) -> dict[str, int]:
        """Bytes kept for backward by one forward (unique storages), per direct child and in total.

        Without checkpointing: everything autograd saves, attributed to the child running. With
        checkpointing: only what is saved outside the checkpointed children plus their inputs
        (kept for the recompute); a child's internals exist only transiently in its backward.
        """
        seen: set[int] = set()
        by: dict[str, int] = {}
        cur = ["outer"]

        def add(t: torch.Tensor, who: str) -> None:
            st = t.untyped_storage()
            if st.data_ptr() not in seen and not isinstance(t, nn.Parameter):
                seen.add(st.data_ptr())
                by[who] = by.get(who, 0) + st.nbytes()

        def pack(t: torch.Tensor) -> torch.Tensor:
            add(t, cur[0])
            return t

        hooks = []
        for name, child in sblk.named_children():
            def pre(_m, args, kwargs, name=name):
                cur[0] = name
                if isinstance(_m, _Checkpointed):
                    for a in list(args) + list(kwargs.values()):
                        for t in a if isinstance(a, tuple) else (a,):
                            if torch.is_tensor(t):
                                add(t, "ckpt_inputs")

            hooks += [child.register_forward_pre_hook(pre, with_kwargs=True),
                      child.register_forward_hook(lambda *_: cur.__setitem__(0, "outer"))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                sblk(**inputs(n_img, n_txt))
        finally:
            for h in hooks:
                h.remove()
        return by

    runs, saved_bytes = [], {}
    state: dict[str, int] = {}
    for ckpt in (False, True):
        undo = checkpoint_children(sblk) if ckpt else None
        n_img, n_txt = TOKENS[0]
        fwd_bwd, opt_step, secs = step(n_img, n_txt, update=not ckpt)
        if not ckpt:
            state = {
                "latent_bytes": _nbytes(m.latent for m in fakes),
                "scale_bytes": _nbytes(m.scale for m in fakes),
                "trainable_bias_bytes": _nbytes(m.bias for m in fakes if m.bias is not None and m.bias.requires_grad),
                "frozen_bytes": _nbytes(p for p in sblk.parameters() if not p.requires_grad),
                "grad_bytes": _nbytes(p.grad for p in params if p.grad is not None),
                "adam_bytes": _nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
            }
        runs.append(dict(grad_checkpoint=ckpt, tokens=n_img + n_txt, image=n_img, text=n_txt,
                         fwd_bwd_peak_bytes=fwd_bwd, activation_bytes=fwd_bwd - state["grad_bytes"],
                         opt_step_peak_bytes=opt_step if not ckpt else None, step_s=round(secs, 2)))
        for n_img, n_txt in TOKENS:
            saved_bytes[f"{'ckpt' if ckpt else 'plain'}_{n_img + n_txt}"] = saved(n_img, n_txt)
        if undo is not None:
            undo()
    return dict(kind=kind, ternary_weights=n_linear, modulation_weights=n_mod, teacher_fp32_bytes=teacher_param_bytes,
                teacher_fwd_peak_bytes=teacher_fwd, state=state, runs=runs, saved_bytes=saved_bytes,
                build_s=round(build_s, 1))


# ---------------------------------------------------------------------------------------- derive
def derive(meas: dict[str, dict]) -> dict[str, Any]:
    """Per-GPU memory for FLUX.1-dev block-wise calibration, joint mode, and GPU-hours.

    Activation at the target token count = measured step activation at the largest measured
    count + (exact saved-for-backward bytes per token) x (extra tokens). With checkpointing the
    per-token rate is the outer saved bytes + child inputs, plus the largest child's internals
    (recomputed, alive during that child's backward only).
    """
    tgt = sum(TARGET)
    (t0, t1) = (sum(TOKENS[0]), sum(TOKENS[1]))
    out: dict[str, Any] = {"blocks": {}}
    for kind, m in meas.items():
        st, sb = m["state"], m["saved_bytes"]
        plain = {r["tokens"]: r["activation_bytes"] for r in m["runs"] if not r["grad_checkpoint"]}
        ckpt = {r["tokens"]: r["activation_bytes"] for r in m["runs"] if r["grad_checkpoint"]}
        opt_peak = next(r["opt_step_peak_bytes"] for r in m["runs"] if not r["grad_checkpoint"])
        rate = lambda key: (sum(sb[f"{key}_{t1}"].values()) - sum(sb[f"{key}_{t0}"].values())) / (t1 - t0)  # noqa: E731
        child_rate = max((sb[f"plain_{t1}"].get(c, 0) - sb[f"plain_{t0}"].get(c, 0)) / (t1 - t0)
                         for c in sb[f"plain_{t1}"] if c != "outer")
        b_plain, b_ckpt = rate("plain"), rate("ckpt") + child_rate
        out["blocks"][kind] = dict(
            train_state_bytes=sum(st.values()),
            first_opt_step_peak_bytes=opt_peak,
            act_plain=dict(measured=plain, saved_per_token=b_plain, at_target=plain[t0] + b_plain * (tgt - t0)),
            act_ckpt=dict(measured=ckpt, saved_per_token=b_ckpt, largest_child_per_token=child_rate,
                          at_target=ckpt[t0] + b_ckpt * (tgt - t0)),
            teacher_fwd_peak_bytes=m["teacher_fwd_peak_bytes"],
        )
    d, s = out["blocks"]["double"], out["blocks"]["single"]
    n_tern = N_DOUBLE * meas["double"]["ternary_weights"] + N_SINGLE * meas["single"]["ternary_weights"]
    teacher_bf16 = 23.8 * GB
    worst = max((d, s), key=lambda b: b["train_state_bytes"] + b["act_plain"]["at_target"])
    plan = {}
    for name, ck in (("no_checkpoint", "act_plain"), ("grad_checkpoint", "act_ckpt")):
        per_sample = worst[ck]["at_target"]
        plan[name] = {
            f"gpu_gb_teacher_resident_mb{mb}": (teacher_bf16 + worst["train_state_bytes"] + mb * per_sample) / GB
            for mb in (1, 4, 16)
        } | {
            f"gpu_gb_teacher_offloaded_mb{mb}": (worst["train_state_bytes"] + mb * per_sample) / GB for mb in (1, 4, 16)
        }
    joint_state = 16 * n_tern  # fp32 latent + grad + 2 Adam moments per ternary weight
    joint_acts = N_DOUBLE * d["act_plain"]["at_target"] + N_SINGLE * s["act_plain"]["at_target"]
    out["ternary_weights_total"] = n_tern
    out["student_fp32_latents_host_gb"] = 4 * n_tern / GB
    out["blockwise_per_gpu"] = plan
    out["joint"] = dict(state_gb=joint_state / GB, teacher_gb=teacher_bf16 / GB,
                        activations_per_sample_gb=joint_acts / GB,
                        total_gb_batch1=(joint_state + teacher_bf16 + joint_acts) / GB)

    # FLOPs per forward at 1024x1024. Double blocks: image-stream Linears see S_img tokens, context
    # Linears S_txt; single blocks all S tokens. The AdaLN modulation Linears run on temb (1 row).
    n_img, n_txt = TARGET
    mod_d, mod_s = meas["double"]["modulation_weights"], meas["single"]["modulation_weights"]
    tok_d = (meas["double"]["ternary_weights"] - mod_d) // 2  # per stream
    lin = N_DOUBLE * 2 * tok_d * (n_img + n_txt) + N_SINGLE * 2 * (meas["single"]["ternary_weights"] - mod_s) * tgt
    lin_if_mod_per_token = lin + 2 * tgt * (N_DOUBLE * mod_d // 2 + N_SINGLE * mod_s)  # per stream, as the brief
    attn = (N_DOUBLE + N_SINGLE) * 4 * tgt * tgt * DIM  # QK^T and PV, 2 FLOP per MAC
    fwd = lin + attn
    prompts, steps, peak, mfu = 7232, 28, 989e12, 0.5
    calls = prompts * steps
    gpu_s = lambda flop: flop / (peak * mfu)  # noqa: E731
    per_block_fwd = fwd / (N_DOUBLE + N_SINGLE)
    prefix = sum(range(1, N_DOUBLE + N_SINGLE + 1)) * per_block_fwd  # teacher re-run up to block i, all i
    out["flops"] = dict(linear_tflop=lin / 1e12, linear_tflop_if_modulation_per_token=lin_if_mod_per_token / 1e12,
                        attention_tflop=attn / 1e12, forward_tflop=fwd / 1e12,
                        teacher_prefix_recompute_per_sample_tflop=prefix / 1e12)
    out["gpu_hours"] = dict(
        recording=gpu_s(calls * fwd) / 3600,
        train_carry_activations=gpu_s(calls * 4 * fwd) / 3600,  # 3F student fwd+bwd + 1F teacher
        train_prefix_recompute=gpu_s(calls * (3 * fwd + prefix)) / 3600,  # as train_blockwise runs today
        recording_brief_94tflop=gpu_s(calls * 94e12) / 3600,
        train_brief_94tflop=gpu_s(calls * 4 * 94e12) / 3600,
    )
    out["assumptions"] = [
        f"{prompts} prompts x {steps} sampling steps = {calls} recorded calls, 1 teacher forward each "
        "(FLUX.1-dev is guidance-distilled: no CFG branch); text encoders/VAE ignored",
        "training = 1 epoch: every block sees every recorded call once (batch 16 -> "
        f"{calls // 16} Adam steps per block); joint mode has the same FLOPs",
        "student fwd+bwd = 3x forward FLOPs; teacher = 1 forward per sample when block-boundary "
        "activations are carried block to block, or sum_i(prefix up to block i) when recomputed",
        f"{mfu:.0%} of H100 dense bf16 {peak / 1e12:.0f} TFLOP/s (autocast bf16 matmuls, fp32 master latents)",
        "activation memory measured fp32 on CPU, linear in tokens; bf16 autocast on GPU would roughly halve it",
        "AdaLN modulation Linears act on temb (1 row/sample): ~0 FLOPs; counting them per token gives the brief's ~79 TFLOP",
    ]
    return out


def _fmt(b: float) -> str:
    return f"{b / GB:7.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", choices=["double", "single"], help="internal: measure one block kind")
    args = ap.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    t = time.perf_counter()  # both kinds at once (2 cores); step times are for information only
    procs = {k: subprocess.Popen([sys.executable, __file__, "--measure", k], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k in ("double", "single")}
    meas = {}
    for kind, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode:
            sys.exit(stderr)
        meas[kind] = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print(f"[measured in {time.perf_counter() - t:.0f} s]", file=sys.stderr)
    der = derive(meas)

    print("\n== per-block training state (counted tensors, fp32) ==")
    print(f"{'block':8}{'ternary W':>12}{'latents':>11}{'scales':>11}{'frozen':>11}{'grads':>11}{'Adam':>11}{'total':>11}")
    for k, m in meas.items():
        st = m["state"]
        print(f"{k:8}{m['ternary_weights'] / 1e6:10.1f} M" + "".join(_fmt(st[x]) + " " for x in
              ("latent_bytes", "scale_bytes", "frozen_bytes", "grad_bytes", "adam_bytes")) + _fmt(sum(st.values())))
    print("\n== one training step, batch 1 (CPU, 1 thread): activation = fwd+bwd peak RSS growth - grads ==")
    print(f"{'block':8}{'ckpt':>6}{'tokens':>8}{'activation':>12}{'1st Adam step':>16}{'step s':>8}")
    for k, m in meas.items():
        for r in m["runs"]:
            o = "-" if r["opt_step_peak_bytes"] is None else _fmt(r["opt_step_peak_bytes"])
            print(f"{k:8}{str(r['grad_checkpoint']):>6}{r['tokens']:8d}{_fmt(r['activation_bytes'])}{o:>16}{r['step_s']:8.1f}")
    print(f"\n== activation per sample extrapolated to {sum(TARGET)} tokens (linear in tokens) ==")
    for k, b in der["blocks"].items():
        p, c = b["act_plain"], b["act_ckpt"]
        print(f"{k:8} plain: {p['saved_per_token'] / 1e6:.3f} MB/token"
              f" -> {_fmt(p['at_target'])}   ckpt: {c['saved_per_token'] / 1e6:.3f} MB/token -> {_fmt(c['at_target'])}")
    print(f"\n== FLUX.1-dev plan ({der['ternary_weights_total'] / 1e9:.2f} B ternary weights) ==")
    print(f"student fp32 latents on host: {der['student_fp32_latents_host_gb']:.1f} GB (CPU RAM, one block moved to the GPU)")
    for name, p in der["blockwise_per_gpu"].items():
        print(f"block-wise, {name}: " + ", ".join(f"{k.replace('gpu_gb_', '')}={v:.1f}" for k, v in p.items()) + " GB")
    j = der["joint"]
    print(f"joint: state {j['state_gb']:.0f} GB + teacher {j['teacher_gb']:.1f} GB + activations "
          f"{j['activations_per_sample_gb']:.0f} GB/sample = {j['total_gb_batch1']:.0f} GB at batch 1")
    f = der["flops"]
    print(f"forward FLOPs at 1024^2: linears {f['linear_tflop']:.1f} TFLOP (modulation per token: "
          f"{f['linear_tflop_if_modulation_per_token']:.1f}) + attention {f['attention_tflop']:.1f} = {f['forward_tflop']:.1f} TFLOP")
    for k, v in der["gpu_hours"].items():
        print(f"GPU-hours {k:28} {v:8.1f}")
    for a in der["assumptions"]:
        print(" - " + a)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"measured": meas, "derived": der}, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
