"""README stays true: its commands parse, its headline figures name results files that exist.

Conventions checked here (keep them when editing README.md):
- the first code block is exactly `make demo` / `make test`;
- every `bitflux ...` line in a code block parses with the real CLI parser (and the bench
  options with the device benchmark's parser), and `bitflux <command> --help` works;
- every row of the table under "## Results" that states a number links a file under
  `bench/results/` that exists, and its command (in backticks) parses too;
- no issue numbers, links into docs/ resolve, and the README stays short.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from bitflux.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def bitflux_lines(text: str) -> list[str]:
    """`bitflux ...` commands of the code blocks, comments dropped, continuation lines joined."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("bitflux "):
                out.append(line)
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_path(argv: list[str]) -> list[str]:
    """The (sub-)command words at the start of argv, e.g. ['toy', 'train']."""
    path, parser = [], build_parser()
    for word in argv:
        choices = _subparsers(parser)
        if word not in choices:
            break
        path.append(word)
        parser = choices[word]
    return path


def check_parses(command: str) -> None:
    """Parse `command` exactly as `bitflux` would, without running it; fail on any usage error."""
    argv = shlex.split(command)[1:]
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"README command does not parse: {command} (exit {e.code})")
    if not getattr(args, "func", None):
        pytest.fail(f"no command in: {command}")
    if getattr(args, "passthrough", False):  # bench: the rest goes to the device benchmark's parser
        import importlib

        from bitflux.bench.commands import module_for

        module = module_for(args.device, extra)
        sub = argparse.ArgumentParser(prog="bench")
        importlib.import_module(module).add_arguments(sub)
        try:
            sub.parse_args(extra)
        except SystemExit as e:
            pytest.fail(f"README bench options do not parse: {command} (exit {e.code})")
    elif extra:
        pytest.fail(f"unrecognised arguments {extra} in: {command}")


def test_readme_opens_with_make_demo_and_make_test():
    first = code_blocks(README)[0]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "venv"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no {target} target"
    assert "TORCH_SPEC" in makefile


COMMANDS = bitflux_lines(README)


def test_readme_has_cli_commands():
    assert len(COMMANDS) >= 8
    assert {command_path(shlex.split(c)[1:])[0] for c in COMMANDS} >= {"quantize", "generate", "inspect", "calibrate", "eval", "bench"}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    check_parses(command)


@pytest.mark.parametrize("path", sorted({tuple(command_path(shlex.split(c)[1:])) for c in COMMANDS}), ids=" ".join)
def test_readme_command_help(path, capsys):
    from bitflux.cli import main

    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: bitflux " + " ".join(path) in capsys.readouterr().out


def test_the_checker_rejects_a_bad_command():
    with pytest.raises(pytest.fail.Exception):
        check_parses("bitflux quantize toy out --no-such-flag")
    with pytest.raises(pytest.fail.Exception):
        check_parses("bitflux bench --device cpu --no-such-flag")


def headline_rows() -> list[str]:
    section = README.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not set(line) <= set("|- ")]
    return rows[1:]  # drop the header


def test_headline_figures_name_existing_results_files():
    rows = headline_rows()
    assert len(rows) >= 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        figures = " ".join(cells[1:3])  # the bitflux and baseline columns
        if not re.search(r"\d", re.sub(r"<!--.*?-->", "", figures)):
            continue  # a row still waiting for its numbers
        links = re.findall(r"\]\((bench/results/[^)]+)\)", row)
        assert links, f"headline row states numbers but names no bench/results file: {row}"
        for link in links:
            assert (ROOT / link).is_file(), f"{link} does not exist (row: {cells[0]})"
        commands = re.findall(r"`(bitflux [^`]+)`", row)
        assert commands, f"headline row names no bitflux command: {cells[0]}"
        for command in commands:
            check_parses(command)


def test_no_issue_numbers_links_resolve_and_short():
    assert not re.search(r"\bissues? \d+|\(#\d+\)|\bissue #\d+", README, flags=re.I)
    for link in re.findall(r"\]\(((?:docs|research|bench)/[^)#]+)", README):
        assert (ROOT / link).exists(), f"README links a missing file: {link}"
    for doc in ("formats", "calibration", "measurements", "design", "research-log"):
        assert f"docs/{doc}.md" in README and (ROOT / "docs" / f"{doc}.md").is_file()
    assert len(README.splitlines()) <= 260


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


DOC_FILES = [ROOT / "README.md", ROOT / "research" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: no heading #{anchor} in {path.name}"


def test_python_snippets_name_existing_api():
    """Every `bitflux.X` and `from bitflux... import Y` in README's Python blocks exists."""
    import importlib

    import bitflux

    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    assert blocks
    code = "\n".join(blocks)
    names = set(re.findall(r"\bbitflux\.([A-Za-z_]\w*)", code))
    assert names >= {"BitfluxConfig", "load", "calibrate", "CalibConfig", "save"}
    for name in names:
        assert hasattr(bitflux, name), f"README uses bitflux.{name}, which does not exist"
    for module, imported in re.findall(r"^from (bitflux[\w.]*) import (.+)$", code, flags=re.M):
        mod = importlib.import_module(module)
        for name in (n.strip() for n in imported.split(",")):
            assert hasattr(mod, name), f"README imports {name} from {module}, which does not exist"
