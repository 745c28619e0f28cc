"""Where the example specs are (the demo and the tests deploy them)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def example_spec_paths() -> list[Path]:
    return sorted([*HERE.glob("*.toml"), *HERE.glob("*/*.toml")])
