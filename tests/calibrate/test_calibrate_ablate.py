"""The ablation sweep: every row changes one setting, and a reduced sweep writes both tables."""

import json
from dataclasses import fields

from bitflux.ablate import default_rows, run_sweep
from bitflux.calibrate import CalibConfig
from bitflux.calibrate.command import eval_settings


def _base(**kw) -> CalibConfig:
    pipe_kwargs, steps = eval_settings("toy")
    return CalibConfig(pipe_kwargs=pipe_kwargs, traj_steps=steps, checkpoint_every=0, **kw)


def test_rows_cover_the_issue_dimensions_and_change_one_thing():
    base = _base(prompts=64, steps=40)
    rows = dict(default_rows(base))
    assert rows["naive absmean"] == "absmean" and rows["naive twn"] == "twn"
    assert rows["calibrated (default)"] == base
    changed = {}
    for name, spec in rows.items():
        if isinstance(spec, CalibConfig) and spec != base:
            changed[name] = {f.name for f in fields(CalibConfig) if getattr(spec, f.name) != getattr(base, f.name)}
    assert changed["init absmean"] == {"init"}
    assert changed["train scales only"] == {"train"}
    assert changed["loss output only"] == {"loss"}
    assert changed["prompts 8"] == {"prompts"} and changed["steps 10"] == {"steps"}
    assert changed["on-policy states at 50%"] == {"on_policy_at"}
    assert changed["on-policy, 3 rounds from 25%"] == {"on_policy_at", "on_policy_rounds"}
    assert changed["block-wise"] == {"mode"}
    assert set(changed) == set(rows) - {"naive absmean", "naive twn", "calibrated (default)"}


def test_reduced_sweep_writes_json_and_markdown(tmp_path):
    rows = run_sweep(tmp_path, _base(prompts=4, steps=3), ["naive absmean", "calibrated (default)"], n_eval=6, progress=False)
    assert [r["row"] for r in rows] == ["bf16", "naive absmean", "calibrated (default)"]
    saved = json.loads((tmp_path / "ablations.json").read_text())
    assert [r["row"] for r in saved] == [r["row"] for r in rows]
    for r in rows[1:]:
        assert 0.0 <= r["overall"] <= 1.0 and r["bytes"] > 0 and r["psnr_db"] is not None
        assert abs(r["ratio_vs_bf16"] - r["overall"] / rows[0]["overall"]) < 1e-9
    md = (tmp_path / "ablations.md").read_text().splitlines()
    assert md[0].startswith("| row |") and len(md) == 2 + len(rows)
