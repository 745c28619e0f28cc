"""Where the example specs are (the demo and the tests deploy them)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE / "workflows"


def example_spec_paths() -> list[Path]:
    """The example functions' specs."""
    every = [*HERE.glob("*.toml"), *HERE.glob("*/*.toml")]
    return sorted(p for p in every if p.parent != WORKFLOWS)


def example_workflow_paths() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.toml"))
