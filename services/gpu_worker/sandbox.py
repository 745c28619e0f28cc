"""Deploy-time handler checks: a dry run of a spec's `module:attr` in a sandbox.

The worker never imports a handler's module to check it: a fresh interpreter does
(`python -m shared.handler_check`, with this worker's import path), in its own
temporary working directory, under a time limit, so that whatever the module does
at import (and whatever it leaves behind) stays out of this process. It builds
nothing and loads no weights: it only says whether the handler imports and takes
what a handler takes.

A handler found sound is remembered, with the file its module is read from as that
file is now: redeploying an unchanged handler starts no interpreter. A problem is
never remembered (it is looked for afresh), and what the module imports is not part
of what is remembered: a change there alone is seen by the next worker process.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib.machinery import PathFinder

import anyio

from shared.config import Settings
from shared.function import handler_packages, handler_refusal
from shared.handler_check import OK, PACKAGES_ENV, SANDBOX_TIMEOUT_S
from shared.logs import get_logger
from shared.schema import ErrorCode, ErrorInfo, HandlerCheck, HandlerCheckReply

log = get_logger("gpu_worker")

# (handler, import path, its module's file, mtime, size) a sandbox found sound.
_SOUND: set[tuple[str, str, str, int, int]] = set()
_SOUND_MAX = 4096


def import_path() -> str:
    """This process's module search path, as PYTHONPATH for the sandbox: it must find
    what a load here would find (the working directory included, made absolute)."""
    return os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)


def source_of(module: str, path: str) -> tuple[str, int, int] | None:
    """The file `module` would be imported from on `path`, found without running any
    code of its packages, with its mtime and size; None when the path finder alone
    cannot tell (a namespace, a builtin, an import hook)."""
    search: list[str] | None = path.split(os.pathsep)
    origin = None
    parts = module.split(".")
    for i in range(len(parts)):
        found = PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if found is None or not found.has_location:
            return None
        search, origin = list(found.submodule_search_locations or []), found.origin
    try:
        stat = os.stat(origin or "")
    except OSError:
        return None
    return str(origin), stat.st_mtime_ns, stat.st_size


class HandlerChecks:
    def __init__(
        self,
        *,
        timeout_s: float = SANDBOX_TIMEOUT_S,
        concurrency: int = 2,
        packages: str = Settings.handler_packages,
    ) -> None:
        self.timeout_s = timeout_s
        # The node's allow-list (GFAAS_HANDLER_PACKAGES): a handler outside it is
        # refused without starting a sandbox; the sandbox is told it too.
        self.packages = packages
        self._allowed = handler_packages(packages)
        # Sandboxes are whole interpreters: a burst of deploys must not fork a crowd.
        self.limiter = anyio.CapacityLimiter(concurrency)

    async def check(self, request: HandlerCheck) -> HandlerCheckReply:
        ref = request.spec.handler
        refusal = handler_refusal(ref, self._allowed)
        if refusal is not None:
            log.info("handler_check.refused", handler=ref, reason=refusal)
            return HandlerCheckReply(error=ErrorInfo(code=ErrorCode.HANDLER_ERROR, reason=refusal))
        path = import_path()
        source = source_of(ref.partition(":")[0], path)
        key = (ref, path, *source) if source is not None else None
        if key in _SOUND:
            return HandlerCheckReply()
        try:
            async with self.limiter:
                problem = await self.dry_run(ref, path)
        except OSError as exc:  # no sandbox could be started: this worker's fault
            log.warning("handler_check.failed", handler=ref, error=repr(exc))
            return HandlerCheckReply(
                error=ErrorInfo(code=ErrorCode.INTERNAL, reason=f"no sandbox for {ref!r}: {exc}")
            )
        if problem is None:
            if key is not None:
                if len(_SOUND) >= _SOUND_MAX:
                    _SOUND.clear()
                _SOUND.add(key)
            return HandlerCheckReply()
        log.info("handler_check.refused", handler=ref, reason=problem)
        return HandlerCheckReply(error=ErrorInfo(code=ErrorCode.HANDLER_ERROR, reason=problem))

    async def dry_run(self, ref: str, path: str) -> str | None:
        """Why `ref` is no handler, as a sandbox with import path `path` finds it, or None."""
        env = dict(os.environ, PYTHONPATH=path, **{PACKAGES_ENV: self.packages})
        command = [sys.executable, "-m", "shared.handler_check", ref]
        with tempfile.TemporaryDirectory(prefix="gfaas-check-", ignore_cleanup_errors=True) as cwd:
            with anyio.move_on_after(self.timeout_s) as scope:
                done = await anyio.run_process(command, cwd=cwd, env=env, check=False)
        if scope.cancelled_caught:  # the sandbox was killed
            return f"handler {ref!r} did not import within {self.timeout_s:g} s"
        said = done.stdout.decode(errors="replace").strip()
        if done.returncode == 0 and said == OK:
            return None
        if done.returncode == 1 and said:
            return said
        # It died, or exited early at import: what it last wrote to stderr says why.
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        last = f": {lines[-1]}" if lines else ""
        status = done.returncode
        return f"handler {ref!r} cannot be imported: its import exited with status {status}{last}"
