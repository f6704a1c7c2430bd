"""`bitflux bench --parts modes` runs on the bundled toy pair (speed only here) and writes its JSON."""

from __future__ import annotations

import json

from bitflux.cli import main


def test_modes_bench_runs_on_the_bundled_pair(tmp_path, capsys):
    rc = main(["bench", "--parts", "modes", "--no-eval", "--iters", "1", "--threads", "1", "--out", str(tmp_path), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["auto_output_equals_resolved"] is True  # `auto` is exactly the mode it resolves to
    assert list(tmp_path.glob("modes-*.json"))
