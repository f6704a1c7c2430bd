"""What the research scripts share: the bundled calibration recipe at probe scale, and writing results."""

from __future__ import annotations

import json
from pathlib import Path

from bitflux.calibrate import CalibConfig
from bitflux.calibrate.command import eval_settings

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"  # where every script writes by default


def bundled_probe_config(prompts: int = 128, steps: int = 400) -> CalibConfig:
    """The bundled `toy-1.58bit` recipe (train all, batch 32, on-policy 3 rounds from 25 %) at a given scale."""
    kwargs, traj_steps = eval_settings("toy")
    return CalibConfig(prompts=prompts, steps=steps, traj_steps=traj_steps, pipe_kwargs=kwargs, checkpoint_every=0,
                       train="all", batch=32, on_policy_at=0.25, on_policy_rounds=3)


def write_json(doc: dict, path: str | Path) -> Path:
    """Write `doc` to `path` atomically (a temporary file renamed), creating the folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)
    return out
