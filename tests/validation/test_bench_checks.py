import argparse
import json

import pytest

from bitflux.bench import checks
from bitflux.integrity import verify
from bitflux.safeio import read_json_object


@pytest.mark.slow
def test_checks_bench_at_full_width_one_block(tmp_path, capsys):
    p = argparse.ArgumentParser()
    checks.add_arguments(p)
    args = p.parse_args(["--layers", "1", "--single-layers", "0", "--scratch", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert checks.main(args) == 0
    ck = tmp_path / "packed"
    assert verify(ck, read_json_object(ck / "config.json"))  # the bench's checkpoint is sealed and loadable
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checkpoint_bytes"] > 50e6 and report["blocks"] == [1, 0]
    for key in ("load_no_verify_s", "load_verify_s", "hash_s", "headers_s", "values_s"):
        assert report[key] > 0
    out = capsys.readouterr().out
    assert "load, verify=False (baseline)" in out and "hash throughput" in out
