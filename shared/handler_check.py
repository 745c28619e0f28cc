"""The sandbox side of a deploy's handler check: `python -m shared.handler_check REF`.

A fresh interpreter, started by a worker in a temporary working directory under a
time limit (services/gpu_worker/sandbox.py), imports what `REF` ("module:attr")
names and checks it against the handler contract (shared/function.py) without
building it or loading weights. Exit status 0 and `ok` on stdout: it is a handler.
Status 1: stdout holds what says why not. Whatever the module prints while it is
imported goes to stderr, so that stdout carries that line alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from shared.config import Settings
from shared.function import handler_packages, handler_problem

# How long a sandbox may take (the interpreter's start included) before the check
# counts as failed: the worker stops it then.
SANDBOX_TIMEOUT_S = 20.0
# What the sandbox prints for a sound handler (an import that exits early prints
# nothing, and is not taken for one).
OK = "ok"
# The environment variable carrying the node's handler packages into the sandbox.
PACKAGES_ENV = "GFAAS_HANDLER_PACKAGES"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m shared.handler_check MODULE:ATTR", file=sys.stderr)
        return 2
    # The worker passes its allow-list on (services/gpu_worker/sandbox.py).
    packages = handler_packages(os.environ.get(PACKAGES_ENV, Settings().handler_packages))
    out = os.dup(1)
    os.dup2(2, 1)  # the module's own output (Python's and C's) goes to stderr
    try:
        problem = handler_problem(argv[0], packages)
    finally:
        sys.stdout.flush()
        os.dup2(out, 1)
        os.close(out)
    print(problem or OK)
    return 0 if problem is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
