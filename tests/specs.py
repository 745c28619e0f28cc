"""Function specs many tests deploy, defined once (handlers in tests/funcs.py)."""

from __future__ import annotations

from shared.schema import FunctionSpec

ECHO = FunctionSpec(name="echo", handler="tests.funcs:echo", concurrency=4)
SLEEP = FunctionSpec(name="sleep", handler="tests.funcs:sleep", concurrency=8)
ADD_ONE = FunctionSpec(name="add-one", handler="tests.funcs:add_one")
