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

A spec with a code bundle (`code`) is checked as its instances will run it: the
bundle fetched, verified and extracted here (services/gpu_worker/bundles.py; a bundle
that is not stored, or whose bytes are not the pinned ones, is refused with the
reason), its directory first on the sandbox's import path and its packages allowed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib.machinery import PathFinder
from pathlib import Path

import anyio

from services.gpu_worker import limits
from services.gpu_worker.bundles import Bundles
from shared.codebundle import BundleError, extracted_packages
from shared.config import Settings
from shared.dataplane.access import HandlerUser
from shared.errors import clipped, described
from shared.function import handler_packages, handler_refusal
from shared.handler_check import AS_OPTION, OK, PACKAGES_ENV, SANDBOX_TIMEOUT_S
from shared.logs import get_logger
from shared.schema import ErrorCode, ErrorInfo, HandlerCheck, HandlerCheckReply

log = get_logger("gpu_worker")

# (handler, import path, its module's file, mtime, size) a sandbox found sound.
_SOUND: set[tuple[str, str, str, int, int]] = set()
_SOUND_MAX = 4096
# Environment variables no sandbox gets (by words in their names): the worker's NATS
# credentials file and password, tokens, keys. Handler code at import has no use for
# them, and with a handler user they are what only the worker may read.
SECRET_ENV = ("CREDS", "CREDENTIAL", "PASSWORD", "PASSWD", "SECRET", "TOKEN", "_KEY")


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
        bundles: Bundles | None = None,
        user: HandlerUser | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        # The node's handler user (a worker as root: privileges.prepare), whom the
        # sandbox runs the module's import as; None: the worker's own user.
        self.user = user
        self.bundles = bundles
        # The node's allow-list (GFAAS_HANDLER_PACKAGES): a handler outside it is
        # refused without starting a sandbox; the sandbox is told it too.
        self.packages = packages
        self._allowed = handler_packages(packages)
        # Sandboxes are whole interpreters: a burst of deploys must not fork a crowd.
        self.limiter = anyio.CapacityLimiter(concurrency)

    async def check(self, request: HandlerCheck) -> HandlerCheckReply:
        ref = request.spec.handler
        allowed, path = self._allowed, import_path()
        if request.spec.code:
            try:
                directory = await self._bundle(request.spec.code)
            except BundleError as exc:
                reason = clipped(str(exc))
                log.info("handler_check.refused", handler=ref, reason=reason)
                return HandlerCheckReply(
                    error=ErrorInfo(code=ErrorCode.HANDLER_ERROR, reason=reason)
                )
            except Exception as exc:  # the code store unreachable: this worker's fault
                log.warning("handler_check.failed", handler=ref, error=described(exc))
                reason = f"no code bundle for {ref!r}: {described(exc)}"
                return HandlerCheckReply(error=ErrorInfo(code=ErrorCode.INTERNAL, reason=reason))
            allowed = (*extracted_packages(directory), *allowed)
            path = os.pathsep.join([str(directory), path])
        refusal = handler_refusal(ref, allowed)
        if refusal is not None:
            log.info("handler_check.refused", handler=ref, reason=refusal)
            return HandlerCheckReply(error=ErrorInfo(code=ErrorCode.HANDLER_ERROR, reason=refusal))
        source = source_of(ref.partition(":")[0], path)
        key = (ref, path, *source) if source is not None else None
        if key in _SOUND:
            return HandlerCheckReply()
        try:
            async with self.limiter:
                problem = await self.dry_run(ref, path, ",".join(allowed))
        except OSError as exc:  # no sandbox could be started: this worker's fault
            reason = f"no sandbox for {ref!r}: {described(exc)}"
            log.warning("handler_check.failed", handler=ref, error=reason)
            return HandlerCheckReply(error=ErrorInfo(code=ErrorCode.INTERNAL, reason=reason))
        if problem is None:
            if key is not None:
                if len(_SOUND) >= _SOUND_MAX:
                    _SOUND.clear()
                _SOUND.add(key)
            return HandlerCheckReply()
        log.info("handler_check.refused", handler=ref, reason=problem)
        return HandlerCheckReply(error=ErrorInfo(code=ErrorCode.HANDLER_ERROR, reason=problem))

    async def _bundle(self, code: str) -> Path:
        if self.bundles is None:
            raise BundleError(f"this worker has no code store to fetch {code} from")
        return await self.bundles.ready(code)

    async def dry_run(self, ref: str, path: str, packages: str | None = None) -> str | None:
        """Why `ref` is no handler, as a sandbox with import path `path` and handler
        packages `packages` (None: the node's) finds it, or None."""
        allowed = self.packages if packages is None else packages
        env = dict(os.environ, PYTHONPATH=path, **{PACKAGES_ENV: allowed})
        command = [sys.executable, "-m", "shared.handler_check", ref]
        with (
            tempfile.TemporaryDirectory(prefix="gfaas-check-", ignore_cleanup_errors=True) as cwd,
            # Files, not pipes: a process the module starts at import inherits them, and
            # a pipe it holds open would keep us waiting after the sandbox has exited.
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
        ):
            command, env = self.confined(command, env, cwd)
            # Its own process group: whatever the import started goes with it.
            process = await anyio.open_process(
                command, cwd=cwd, env=env, stdin=None, stdout=out, stderr=err,
                start_new_session=True,
            )  # fmt: skip
            try:
                with anyio.move_on_after(self.timeout_s) as scope:
                    await process.wait()
            finally:
                limits.kill_group(process.pid)
                if process.returncode is None:
                    with anyio.CancelScope(shield=True):
                        await process.wait()
            out.seek(0)
            err.seek(0)
            said = out.read().decode(errors="replace").strip()
            stderr = err.read().decode(errors="replace")
        if scope.cancelled_caught:  # the sandbox was killed
            return f"handler {ref!r} did not import within {self.timeout_s:g} s"
        if process.returncode == 0 and said == OK:
            return None
        if process.returncode == 1 and said:
            # The module's own words may be in it (its exception at import): one line.
            return clipped(said)
        # It died, or exited early at import: what it last wrote to stderr says why.
        lines = stderr.strip().splitlines()
        last = f": {clipped(lines[-1])}" if lines else ""
        status = process.returncode
        return f"handler {ref!r} cannot be imported: its import exited with status {status}{last}"

    def confined(
        self, command: list[str], env: dict[str, str], cwd: str
    ) -> tuple[list[str], dict[str, str]]:
        """The sandbox's command and environment: none of the worker's secrets (it needs
        no NATS: SECRET_ENV), and with a handler user, run as that user in `cwd`, made
        its own (0700): the sandbox switches before the module is imported
        (shared/handler_check.py `become`)."""
        env = {k: v for k, v in env.items() if not any(w in k.upper() for w in SECRET_ENV)}
        if self.user is None:
            return command, env
        os.chown(cwd, self.user.uid, self.user.gid, follow_symlinks=False)
        env.update(HOME=cwd, TMPDIR=cwd, USER=self.user.name, LOGNAME=self.user.name)
        module, ref = command[:-1], command[-1]
        return [*module, AS_OPTION, f"{self.user.uid}:{self.user.gid}", ref], env
