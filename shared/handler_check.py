"""The sandbox side of a deploy's handler check: `python -m shared.handler_check REF`.

A fresh interpreter, started by a worker in a temporary working directory under a
time limit (services/gpu_worker/sandbox.py), imports what `REF` ("module:attr")
names and checks it against the handler contract (shared/function.py) without
building it or loading weights. Exit status 0 and `ok` on stdout: it is a handler.
Status 1: stdout holds what says why not. Whatever the module prints while it is
imported goes to stderr, so that stdout carries that line alone.

With `--as UID:GID` (a worker as root with a handler user, issue 10) it switches to
that user for good before the module is imported, as an instance does
(shared/procs.py `switch_user`: groups dropped, gid and uid set,
no_new_privs, checked): the module's import runs as the handler user. It is started
as root and switches itself, rather than being started as the user, because the
user need not be able to run the interpreter (it may live in root's 0700 home);
what an instance has imported before its handler is imported first
(BEFORE_SWITCH), as the user may not be able to read the interpreter's libraries.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from shared.config import Settings
from shared.function import handler_packages, handler_problem
from shared.procs import switch_user

# How long a sandbox may take (the interpreter's start included) before the check
# counts as failed: the worker stops it then.
SANDBOX_TIMEOUT_S = 20.0
# What the sandbox prints for a sound handler (an import that exits early prints
# nothing, and is not taken for one).
OK = "ok"
# The environment variable carrying the node's handler packages into the sandbox.
PACKAGES_ENV = "GFAAS_HANDLER_PACKAGES"
# The option that makes the sandbox switch to the handler user: `--as UID:GID`.
AS_OPTION = "--as"
# What an instance process has imported before its handler's module (its warm-up),
# imported before the switch: the handler user may not be able to read them.
BEFORE_SWITCH = ("numpy", "torch")


def main(argv: Sequence[str]) -> int:
    user = None
    if len(argv) == 3 and argv[0] == AS_OPTION:
        uid, _, gid = argv[1].partition(":")
        user, argv = (int(uid), int(gid)), argv[2:]
    if len(argv) != 1:
        print("usage: python -m shared.handler_check [--as UID:GID] MODULE:ATTR", file=sys.stderr)
        return 2
    # The worker passes its allow-list on (services/gpu_worker/sandbox.py).
    packages = handler_packages(os.environ.get(PACKAGES_ENV, Settings().handler_packages))
    out = os.dup(1)
    os.dup2(2, 1)  # the module's own output (Python's and C's) goes to stderr
    try:
        if user is not None:
            become(*user)
        problem = handler_problem(argv[0], packages)
    finally:
        sys.stdout.flush()
        os.dup2(out, 1)
        os.close(out)
    print(problem or OK)
    return 0 if problem is None else 1


def become(uid: int, gid: int) -> None:
    """Switch to the handler user `uid`:`gid` for good, what an instance has imported by
    then imported first. Exits (status 70) rather than go on if anything of root's is
    left."""
    for module in BEFORE_SWITCH:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    # The instances' own switch, not a second one to keep in step.
    switch_user(uid, gid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
