"""`bitflux toy ...`: train the toy FLUX, render ground-truth images, list prompts."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ..errors import BitfluxError, OutputExistsError


def _train(args: argparse.Namespace) -> int:
    import torch

    from ..cli import print_result
    from .build import ToyConfig
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.minutes <= 0:
        raise BitfluxError("--minutes must be positive")
    steps = TrainConfig.steps if args.steps is None else args.steps or None  # 0: fit the budget
    if not 0 <= args.partial_captions <= 1:
        raise BitfluxError("--partial-captions must be in [0, 1]")
    if not 0 <= args.absolute_positions < 1:
        raise BitfluxError("--absolute-positions must be in [0, 1)")
    if not 0 <= args.canonical_positions <= 1:
        raise BitfluxError("--canonical-positions must be in [0, 1]")
    cfg = TrainConfig(
        minutes=args.minutes,
        seed=args.seed,
        vae_steps=args.vae_steps,
        steps=steps,
        logit_mean=args.logit_mean,
        partial_captions=args.partial_captions,
        absolute_positions=args.absolute_positions,
        canonical_positions=args.canonical_positions,
        world=args.world,
    )
    for name in ("heads", "head_dim", "double_blocks", "single_blocks"):
        if getattr(args, name) < 1:
            raise BitfluxError(f"--{name.replace('_', '-')} must be >= 1")
    if args.head_dim % 4:
        raise BitfluxError("--head-dim must be a multiple of 4 (it is split over three rope axes)")
    model_cfg = ToyConfig(
        width_heads=args.heads,
        head_dim=args.head_dim,
        num_layers=args.double_blocks,
        num_single_layers=args.single_blocks,
        generic_words=args.partial_captions > 0,
    )
    out = train(args.output, cfg, resume=args.resume, model_cfg=model_cfg, extend_to=args.extend_to)
    info = (out / "bitflux_toy.json").read_text()
    import json

    res = {"output": str(out), **json.loads(info)}
    print_result(res, args.json, f"wrote {out} ({res['steps']} transformer steps in {res['train_seconds']:.0f}s)")
    return 0


def _render(args: argparse.Namespace) -> int:
    from ..cli import print_result
    from .variants import get_world
    from .world import parse_prompt, render, scene_for_spec

    out = Path(args.output)
    if out.exists():
        raise OutputExistsError(f"output path exists: {out} (bitflux never overwrites)")
    world = get_world(args.world)
    spec = parse_prompt(args.prompt, world)
    scene = scene_for_spec(random.Random(args.seed), spec, world)
    img = render(scene, world)
    if args.scale > 1:
        img = img.resize((img.width * args.scale, img.height * args.scale), 0)
    from ..eval.grid import save_image

    save_image(img, out)
    res = {"output": str(out), "category": spec.category.value, "objects": [o.__dict__ for o in scene.objects]}
    print_result(res, args.json, f"wrote {out} ({spec.category.value})")
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from ..cli import print_result
    from .variants import get_world
    from .world import prompts

    items = prompts(args.split, args.n, args.seed, get_world(args.world))
    res = {"split": args.split, "world": args.world, "prompts": [{"prompt": t, "category": c.value} for t, c in items]}
    print_result(res, args.json, "\n".join(f"{c.value:<14} {t}" for t, c in items))
    return 0


_WORLD_ARG = dict(choices=("default", "heldout-b", "palette-b"), default="default")  # = toy.variants.WORLDS (tested)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `toy train`, `toy render` and `toy prompts`."""
    p = sub.add_parser(
        "toy",
        help="the toy world: train the bundled tiny FLUX, render ground truth, list prompts",
        description="The toy compositional world (coloured shapes, GenEval-style prompts) and its tiny FLUX.",
    )
    tsub = p.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")

    t = tsub.add_parser(
        "train",
        help="train the tiny FLUX pipeline on the toy world (CPU, reproducible)",
        description="Train the VAE, then the FLUX transformer and text encoders (flow matching) on "
        "rendered training-split scenes, and save a FluxPipeline directory to OUT. Checkpoints "
        "(safetensors) go to OUT.work/; --resume continues from them exactly.",
    )
    t.add_argument("output", metavar="OUT", help="pipeline directory to create (must not exist)")
    t.add_argument("--minutes", type=float, default=58.0, help="wall-clock budget for all phases (default 58)")
    t.add_argument("--seed", type=int, default=0, help="seed of data, init and batches (default 0)")
    t.add_argument("--resume", action="store_true", help="continue from OUT.work/ checkpoints")
    t.add_argument(
        "--extend-to", type=int, default=None, metavar="STEPS",
        help="with --resume: train the checkpointed run on to STEPS transformer steps, re-planning the cosine "
        "schedule from the current step (copy a finished run's OUT.work/ to a new OUT.work/ first)",
    )
    t.add_argument("--vae-steps", type=int, default=2000, help="VAE steps (default 2000)")
    t.add_argument("--steps", type=int, default=None, help="transformer steps (default 12000; 0: as many as fit the budget)")
    t.add_argument(
        "--logit-mean", type=float, default=0.0, help="mean of the logit-normal noise levels; > 0 favours high noise (default 0)"
    )
    t.add_argument(
        "--partial-captions",
        type=float,
        default=0.0,
        help="share of coloured objects captioned 'a <colour> object'; > 0 also shows held-out pairs, unnamed (default 0)",
    )
    t.add_argument(
        "--absolute-positions",
        type=float,
        default=0.0,
        help="share of scenes that are one object at a grid edge, captioned 'a red circle to the left' (default 0)",
    )
    t.add_argument(
        "--canonical-positions",
        type=float,
        default=0.0,
        help="share of relation scenes drawn at fixed far-apart cells (first object at the named side; default 0)",
    )
    t.add_argument("--heads", type=int, default=4, help="attention heads; width = heads x head dim (default 4)")
    t.add_argument("--head-dim", type=int, default=32, help="attention head dim, a multiple of 4 (default 32)")
    t.add_argument("--double-blocks", type=int, default=2, help="double-stream blocks (default 2)")
    t.add_argument("--single-blocks", type=int, default=4, help="single-stream blocks (default 4)")
    t.add_argument("--world", **_WORLD_ARG, help="toy-world variation: palette and held-out compositions, "
                   "recorded in OUT so eval and calibration use it (default: default; see bitflux.toy.variants)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--json", action="store_true", help="print the training summary as JSON")
    t.set_defaults(func=_train)

    r = tsub.add_parser(
        "render",
        help="render a ground-truth image for a prompt of the toy grammar",
        description="Parse PROMPT with the toy grammar, place objects that satisfy it, and save the image.",
    )
    r.add_argument("prompt", metavar="PROMPT", help='e.g. "a red circle to the left of a blue square"')
    r.add_argument("output", metavar="OUT", help="image file to write (must not exist)")
    r.add_argument("--seed", type=int, default=0, help="placement seed (default 0)")
    r.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling factor (default 1)")
    r.add_argument("--world", **_WORLD_ARG, help="toy-world variation whose grammar and palette to use (default: default)")
    r.add_argument("--json", action="store_true", help="print the placed objects as JSON")
    r.set_defaults(func=_render)

    q = tsub.add_parser(
        "prompts",
        help="list prompts of a split with their categories",
        description="List toy prompts: 'train' prompts never contain held-out compositions; "
        "'heldout' prompts always do (except single_object, which has none to hold out).",
    )
    q.add_argument("--split", choices=("train", "heldout"), default="heldout", help="which split (default heldout)")
    q.add_argument("--n", type=int, default=12, help="how many (default 12)")
    q.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    q.add_argument("--world", **_WORLD_ARG, help="toy-world variation whose split to list (default: default)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_prompts)

    def _help(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
