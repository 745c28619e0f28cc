"""Function specs many tests deploy, defined once (handlers in tests/funcs.py)."""

from __future__ import annotations

from shared.schema import FunctionSpec

ECHO = FunctionSpec(name="echo", handler="tests.funcs:echo", concurrency=4)
SLEEP = FunctionSpec(name="sleep", handler="tests.funcs:sleep", concurrency=8)
ADD_ONE = FunctionSpec(name="add-one", handler="tests.funcs:add_one")

# ADD_ONE as the spec file `gfaas deploy` reads (tests of the CLI and `gfaas up`).
ADD_ONE_TOML = """
name = "add-one"
handler = "tests.funcs:add_one"
kind = "cpu"

[[inputs]]
name = "x"
dtype = "float32"
shape = [-1]
"""
