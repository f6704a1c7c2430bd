"""`bitflux bench --parts calibrate-scale` at reduced size: it runs, measures, projects, writes JSON."""

from __future__ import annotations

import json

import torch

from bitflux.bench import calibrate_scale
from bitflux.cli import main


def _tiny_flux_dir(path):
    """A FLUX transformer with FLUX.1-dev's structure at toy width, sharded like the hub's."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                               axes_dims_rope=(4, 6, 6), guidance_embeds=True)
    m.to(dtype=torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


def test_calibrate_scale_runs_at_reduced_size_and_writes_json(tmp_path, capsys):
    model = _tiny_flux_dir(tmp_path / "tiny")
    out = tmp_path / "r.json"
    rc = main(["bench", "--parts", "calibrate-scale", "--model", str(model), "--size", "64", "--text-len", "8",
               "--prompts", "2", "--traj-steps", "2", "--steps-per-block", "2", "--threads", "1", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    r = json.loads(out.read_text())
    assert printed["json"] == str(out) and r["blocks"] == 3 and r["recorded_calls"] == 2 * 2
    assert len(r["block_step_seconds"]) == 3  # one timed step (the second) per block
    assert len(r["block_seconds"]) == 3 and set(r["block_seconds_by_kind"]) == {"double", "single"}
    # a block's wall time holds its two steps and more
    assert all(b > s for b, s in zip(r["block_seconds"], r["block_step_seconds"]))
    assert r["blocks_seconds_total"] <= r["total_seconds"] - r["record_seconds"] + 0.2
    assert r["peak_rss_gb"] > 0 and r["teacher_bytes"] > 0 and r["ternary_linears"] > 0
    p = r["projection"]
    assert p["flops"]["total"] == sum(v for k, v in p["flops"].items() if k != "total")
    assert p["h100_hours"] > 0 and p["assumptions"]["prompts"] == 7232


def test_flop_count_matches_the_linear_layers_of_a_flux_dev_double_block():
    """Counted forward FLOPs of a full-width double block = 2 x tokens x its token-wise Linear weights
    (q, k, v, out and the 4x MLP: 12 C^2 per stream) + attention (QK^T and AV over the joint sequence)."""
    from bitflux.archs import FLUX_DEV_CONFIG as cfg  # 19 double + 38 single blocks

    f = calibrate_scale.block_flops(cfg, 1024, 512)
    c, img, txt = 3072, 4096, 512
    expected = 2 * 12 * c * c * (img + txt) + 4 * (img + txt) ** 2 * c
    assert abs(f["double_forward"] - expected) / expected < 0.01
    assert 2.5 < f["double_train_step"] / f["double_forward"] < 3.5  # backward ~ 2x forward
    assert f["model_forward"] == 19 * f["double_forward"] + 38 * f["single_forward"]


def test_one_step_per_block_still_times_each_block(tmp_path):
    """--steps-per-block 1 (the full-depth run) cannot time a lone step, but every block's wall time is measured."""
    model = _tiny_flux_dir(tmp_path / "tiny")
    out = tmp_path / "r.json"
    rc = main(["bench", "--parts", "calibrate-scale", "--model", str(model), "--size", "64", "--text-len", "8",
               "--steps-per-block", "1", "--threads", "1", "--out", str(out), "--json"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["block_step_seconds"] == [] and r["block_step_seconds_mean"] is None
    assert len(r["block_seconds"]) == 3 and all(t > 0 for t in r["block_seconds"])
    assert "not timed" in calibrate_scale._table(r)
