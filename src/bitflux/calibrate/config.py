"""The calibration options: `CalibConfig` and the enums it is built from.

The whole config is recorded in every checkpoint, so a resume with other options is refused.
Options tried on the toy and not adopted (guided, CFG-difference and gain losses, extrapolated
CFG targets, time weights, text-token mixing, rollout steps, EMA, fresh on-policy noise) were
removed; their measured rows stay in `bench/results/ablations-toy128.json` and docs/.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from ..config import InitMethod, PackFormat
from ..errors import BitfluxError


class Mode(str, Enum):
    """How the student is trained."""

    JOINT = "joint"
    """The whole student at once (fp32 latents + Adam for every layer in memory)."""
    BLOCKWISE = "blockwise"
    """One block at a time against the teacher's own block inputs/outputs (fits 12B on one device)."""


class LossKind(str, Enum):
    """What the student matches."""

    OUTPUT = "output"
    """The transformer's output (the velocity) at each recorded state."""
    BLOCKS = "blocks"
    """The output plus every double/single block's hidden states (feature matching)."""


class TrainWhat(str, Enum):
    """Which student tensors calibration updates."""

    SCALES = "scales"
    """Only the per-row scales; the codes stay those of the initialisation."""
    LATENT = "latent"
    """Latent weights (through the straight-through estimator) and scales."""
    ALL = "all"
    """Latent weights, scales and the ternary layers' biases."""
    FULL = "full"
    """All of `all`, plus the layers the policy keeps in full precision (embedders, norm_out,
    proj_out): stored anyway, so the size is unchanged."""


@dataclass(frozen=True)
class CalibConfig:
    """Calibration options; the whole config is recorded in checkpoints to refuse mismatched resumes."""

    init: InitMethod = InitMethod.TWN  # initial codes/scales
    train: TrainWhat = TrainWhat.LATENT  # what is trained
    loss: LossKind = LossKind.BLOCKS  # what is matched
    format: PackFormat = PackFormat.TWO_BIT  # packing of the saved result
    prompts: int = 256  # number of calibration prompts used
    traj_steps: int = 8  # denoising steps of each teacher trajectory
    steps: int = 600  # optimiser steps (block-wise: split evenly over the blocks)
    batch: int = 16  # recorded transformer calls per step (the global batch over all processes)
    lr: float = 2e-3  # Adam learning rate (latents live on a unit scale, see student.FakeTernaryLinear)
    seed: int = 0  # trajectories, batches
    checkpoint_every: int = 100  # joint: steps between resumable checkpoints (0: never); block-wise: every block
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)  # extra FluxPipeline call arguments (height, width, CFG)
    record_batch: int = 16  # prompts per teacher pipeline call
    mode: Mode = Mode.JOINT  # joint or block-wise training (see blockwise.py)
    block_pool: int = 0  # block-wise: recorded calls carried from block to block (0: all)
    on_policy_at: float = 0.0  # joint: after this share of the steps, the states the student itself
    # visits (same prompts and noise, teacher targets) join the pool; 0: teacher states only
    on_policy_rounds: int = 1  # on-policy refreshes, evenly spaced from on_policy_at to the end (DAgger)
    shard: bool = False  # joint under torch.distributed: FSDP2 shards the student and its Adam state (1/N each)

    def on_policy_steps(self) -> list[int]:
        """The steps at which student-visited states join the pool (empty: never)."""
        if self.on_policy_at <= 0:
            return []
        gap = (1.0 - self.on_policy_at) / self.on_policy_rounds
        return [round((self.on_policy_at + k * gap) * self.steps) for k in range(self.on_policy_rounds)]

    def on_policy_step(self) -> int | None:
        """The first on-policy refresh step (None: never)."""
        steps = self.on_policy_steps()
        return steps[0] if steps else None

    def __post_init__(self) -> None:
        enums = (("init", InitMethod), ("train", TrainWhat), ("loss", LossKind), ("format", PackFormat), ("mode", Mode))
        for name, enum in enums:
            object.__setattr__(self, name, enum(getattr(self, name)))
        for name in ("prompts", "traj_steps", "steps", "batch", "record_batch"):
            if getattr(self, name) < 1:
                raise BitfluxError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.block_pool < 0:
            raise BitfluxError("checkpoint_every and block_pool must be >= 0")
        if not self.lr > 0:
            raise BitfluxError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.on_policy_at < 1.0:
            raise BitfluxError(f"on_policy_at must be in [0, 1), got {self.on_policy_at}")
        if self.on_policy_rounds < 1:
            raise BitfluxError(f"on_policy_rounds must be >= 1, got {self.on_policy_rounds}")
        if self.train is TrainWhat.FULL and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("--train full needs joint mode (the kept layers lie outside the blocks)")
        if self.shard and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("--shard is for joint mode (block-wise training already holds one block at a time)")
        if self.on_policy_at > 0 and self.mode is Mode.BLOCKWISE:
            raise BitfluxError("on-policy states need joint mode (block-wise training has no whole student to sample with)")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=lambda e: e.value))
