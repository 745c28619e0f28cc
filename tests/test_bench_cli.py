"""Every benchmark module imports, and every one with a `main` answers `--help`.

The benchmarks (bench/, each `python -m bench.<name>`) have no tests of their own, so
an import that a change in the services broke, or an argument parser that fails,
went unseen until someone ran them. In-process: each module imported once, its
`main` called with `--help` (argparse prints the usage and exits 0). A `main` must
parse its arguments before it does anything else, or `--help` would run it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


def main_of(name: str) -> ast.FunctionDef | None:
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)


MAINS = [name for name in MODULES if main_of(name) is not None]


def before_parsing(name: str) -> list[str]:
    """The statements of `name`'s main before it parses its arguments, other than
    building its parser: what `--help` would run (None at all: no parse_args)."""
    source = (BENCH / f"{name}.py").read_text()
    main = main_of(name)
    assert main is not None
    ran: list[str] = []
    for stmt in main.body:
        text = ast.get_source_segment(source, stmt) or ""
        if "parse_args(" in text:
            return ran
        if not text.startswith(("parser", '"""')):
            ran.append(text)
    raise AssertionError(f"bench.{name}.main never parses its arguments: --help would run it")


@pytest.mark.unit
def test_the_bench_modules_are_found() -> None:
    assert {"overhead", "dp_copy", "sim_policies", "plotting"} <= set(MODULES)
    assert "plotting" not in MAINS
    assert len(MAINS) >= 20, MAINS


@pytest.mark.unit
@pytest.mark.parametrize("name", MODULES)
def test_each_bench_module_imports(name: str) -> None:
    importlib.import_module(f"bench.{name}")


@pytest.mark.unit
@pytest.mark.parametrize("name", MAINS)
def test_each_bench_answers_help_and_runs_nothing(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert before_parsing(name) == [], f"bench.{name}.main runs these before --help is seen"
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out
