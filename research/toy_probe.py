"""Short toy-training probes: does a trainer option help, measured in ~10 minutes instead of 55.

What: trains the toy transformer + text encoders from scratch for --steps steps (the bundled toy's
VAE is reused, so the codec is fixed), with one TrainConfig option changed per row, then scores the
EMA model on held-out prompts (96 x 2 seeds) and training prompts (96 x 1 seed). Every row uses the
same data seed, batch order and noise. Early scores only rank options roughly: one row is about
10 minutes on the 2-core CPU, and with 32 images per category a category moves by +-0.08 by chance.
Prints a table and writes bench/results/toy-probe.json.

    python research/toy_probe.py --steps 2500 --rows base logit_mean=0.7 partial_captions=0.25
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from bitflux.eval import evaluate
from bitflux.toy import bundled_path
from bitflux.toy.build import ToyConfig, build_pipeline
from bitflux.toy.data import make_data
from bitflux.toy.train import TrainConfig, encode_latents, train_flow
from bitflux.toy.world import CATEGORIES, HELDOUT_COLOR_SHAPE, parse_prompt
from common import RESULTS
from overrides import parse_row


def probe(overrides: dict, steps: int, n_scenes: int) -> dict:
    cfg = TrainConfig(**{**overrides, "steps": steps, "n_scenes": n_scenes, "ckpt_every_s": 1e9})
    pipe = build_pipeline(cfg.seed, ToyConfig(generic_words=cfg.partial_captions > 0))
    pipe.vae = AutoencoderKL.from_pretrained(bundled_path("toy") / "vae")
    data = make_data(cfg.n_scenes, cfg.seed, pipe.tokenizer, pipe.tokenizer_2, cfg.partial_captions, cfg.absolute_positions, cfg.canonical_positions)
    z = encode_latents(pipe.vae, data.images)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        info = train_flow(pipe, z, data, cfg, 1e9, Path(work))
    seconds = time.perf_counter() - t0
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    res = {"overrides": overrides, "steps": steps, "train_seconds": round(seconds), "final_loss": round(info["final_loss"], 4)}
    for split, seeds in (("heldout", 2), ("train", 1)):
        r = evaluate(pipe, split, seeds=seeds)
        res[split] = {k: r[k] for k in ("overall", *[c.value for c in CATEGORIES])}
        if split == "heldout":
            v, items = r["_verdicts"], r["_items"]
            cols = [j for j, it in enumerate(items) if any((o.color, o.shape) in HELDOUT_COLOR_SHAPE for o in parse_prompt(it.text).objects)]
            res["heldout_pair_accuracy"] = round(float(v[:, cols].mean()), 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--n-scenes", type=int, default=30_000)
    ap.add_argument("--rows", nargs="+", default=["base", "logit_mean=0.7", "partial_captions=0.25"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "toy-probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for row in args.rows:
        rows.append({"row": row, **probe(parse_row(row, TrainConfig()), args.steps, args.n_scenes)})
        r = rows[-1]
        print(f"{row:<28} held-out {r['heldout']['overall']:.3f}  held-out pairs {r['heldout_pair_accuracy']:.3f}  "
              f"train {r['train']['overall']:.3f}  {r['train_seconds']}s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
