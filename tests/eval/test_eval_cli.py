"""`bitflux eval` and the evaluation API on the bundled toy model (tiny runs: few prompts, 2 steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bitflux.cli import main
from bitflux.toy.world import CATEGORIES, IMAGE_SIZE

FAST = ["--n", "6", "--seeds", "1", "--steps", "2", "--threads", "1"]


def _one_line_error(capsys, rc: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("bitflux: error:"), err
    assert needle in err[0]


def test_eval_json_has_overall_and_every_category(capsys):
    rc = main(["eval", "toy", *FAST, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for key in ["overall", *(c.value for c in CATEGORIES)]:
        assert 0.0 <= out[key] <= 1.0
    assert out["overall"] == pytest.approx(np.mean([out[c.value] for c in CATEGORIES]), abs=1e-3)
    assert out["fidelity"] == {"psnr_db": 100.0, "verdict_agreement": 1.0}
    assert out["n_prompts"] == 6 and out["steps"] == 2


def test_eval_naive_ternary_with_grid(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    rc = main(["eval", "toy", "--naive", *FAST, "--grid", str(grid), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["naive"] is True
    assert out["fidelity"]["psnr_db"] < 100.0  # ternary weights change the images
    img = Image.open(grid)
    assert img.width > 2 * IMAGE_SIZE * 4 and img.height >= 6 * IMAGE_SIZE * 4  # two model columns, six prompt rows
    assert main(["eval", "toy", "--naive", *FAST, "--grid", str(grid)]) == 2  # never overwrites


def test_missing_model_dir_is_a_one_line_error(tmp_path, capsys):
    _one_line_error(capsys, main(["eval", str(tmp_path / "nope"), *FAST]), "nope")


def test_broken_model_dir_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    _one_line_error(capsys, main(["eval", str(bad), *FAST]), "broken")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, main(["eval", str(empty), *FAST]), "empty")


def test_prompt_outside_grammar_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\na photo of a dog\n")
    _one_line_error(capsys, main(["eval", "toy", "--prompts", str(f), *FAST]), "outside the toy grammar")


def test_prompt_file_is_scored_by_its_categories(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\na red circle\ntwo blue squares\n")
    assert main(["eval", "toy", "--prompts", str(f), *FAST, "--no-fidelity", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_prompts"] == 2 and set(out) >= {"colors", "counting", "overall"}
    assert "position" not in out


def test_evaluate_api_pairs_a_transformer_with_toy():
    from bitflux.eval import EvalConfig, evaluate, load_model
    from bitflux.eval.runner import load_prompts

    pipe = load_model("toy")
    items = load_prompts("heldout", 6)
    cfg = EvalConfig(steps=2)
    a = evaluate(pipe, items, 1, cfg)
    b = evaluate(pipe.transformer, items, 1, cfg, reference=a["_images"])
    assert np.array_equal(a["_images"], b["_images"])  # same seeds, same model: same images
    assert b["fidelity"] == {"psnr_db": 100.0, "verdict_agreement": 1.0}
    assert a["_images"].shape == (1, 6, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_the_teacher_is_the_models_own_source_pipeline(tmp_path):
    """A quantised transformer is compared with the pipeline it was quantised from (a wider toy,
    another world), a pipeline dir with itself, and a transformer without a source with `toy`."""
    import json

    from bitflux.eval.commands import _teacher
    from bitflux.pipeline import ModelRef

    own = tmp_path / "my-toy"
    own.mkdir()
    (own / "model_index.json").write_text("{}")
    q = tmp_path / "q"
    q.mkdir()
    toy = tmp_path / "bundled-toy"
    for source, want in [(str(own), own), ("", toy), (str(tmp_path / "gone"), toy)]:
        (q / "config.json").write_text(json.dumps({"quantization_config": {"source": source}}))
        assert _teacher(ModelRef(str(toy), str(q)), toy) == want
    assert _teacher(ModelRef(str(own), None), toy) == own
