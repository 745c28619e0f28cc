"""Instance processes as the node's handler user (issue 10: handler code runs with the
least privilege the node allows).

When the agent runs as root and GFAAS_HANDLER_USER names a user (shared.dataplane.access),
every instance process switches to that user, for good, before any code of its
handler is imported: it cannot read what only root may (the admin's credentials,
/root, the auth directory), cannot raise the limits the agent set on it (limits.py),
and cannot get root back.

The switch happens at assignment (standby.main, `become`), not at spawn:
- a spare is started before it knows its function, but every instance runs as the one
  user: only its directory waits for the assignment;
- what only root may read is read first and kept in memory: the worker's NATS
  credentials (the file stays 0600 in its 0700 directory), the NATS CA copied into the
  instance's directory;
- a process that switches users becomes non-dumpable: another process of the same
  user (another instance's handler) can neither ptrace it nor read its memory or its
  environment, which a process started as that user would allow;
- the interpreter need not be executable by the user (on this VM it lives under /root).
The cost: what the process imports after the switch must be readable by the user (its
handler packages; the interpreter's modules the warm-up did not import, AFTER_SWITCH).

The switch: supplementary groups dropped, gid and uid set (real, effective and saved:
no way back), no_new_privs (a setuid binary it runs gains nothing), the parent-death
signal re-armed (the switch clears it), all checked; then its directory is its working
directory, HOME and TMPDIR.

On the node side (`prepare`, as the agent starts, as root): the user resolved (one that
does not exist stops the worker at once with that reason), the state directory
checked reachable by it, the node's shared segments opened to its group, the host
tier's locks (and the span files' directory) writable by that group; `InstanceDirs`
makes each instance's directory (0700, the user's) and removes it once the
instance's process is gone. The node's model cache stays root's: an instance reads
it and fetches what it lacks into its own directory (`weights_fetcher`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import os
import shutil
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from shared import tracing
from shared.config import Settings
from shared.dataplane import access
from shared.dataplane.access import HandlerUser, HandlerUserError, unreachable
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.modelswap import HostTier, tier_prefix
from shared.procs import switch_user

log = get_logger("gpu_worker")

WeightsFetcher = Callable[[str], Awaitable[Path]]

# Under the state directory: one directory per agent, one per instance in it.
INSTANCES_DIR = "instances"
# Modules an instance imports only after the switch, lazily, which the user may not
# be able to read from the interpreter's directory: the hostname codec asyncio's
# connect uses.
AFTER_SWITCH = ("encodings.idna",)
# The copy of the NATS CA in the instance's directory (verifying the server needs it
# at every connect).
CA_COPY = "nats-ca.pem"
# Where a profile run in an instance process leaves its ProfileReply for the agent.
PROFILE_FILE = "profile.json"

_PR_SET_PDEATHSIG = 1


# -- the node side (the agent, as root) --------------------------------------------------


def prepare(settings: Settings) -> HandlerUser | None:
    """As a worker (not an instance) starts: the user its instances run as, or None (off,
    or not root); everything it must reach made reachable to it. Raises
    HandlerUserError with the reason when the user cannot be used."""
    user = access.handler_user(settings)
    access.share_segments(user)
    if user is None:
        if access.auto_off() is not None:
            # The default could not apply here: say so once, loudly (and in status).
            log.warning("agent.handler_user_off", reason=access.auto_off())
        elif settings.handler_user.strip().lower() not in access.OFF:
            log.info("agent.handler_user_ignored", user=settings.handler_user, reason="not root")
        return None
    uid_range(settings.handler_uids)  # a bad range stops the worker now, with why
    state_dir = settings.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    blocked = unreachable(state_dir, user)
    if blocked is not None:
        raise HandlerUserError(
            f"the handler user {user.name!r} (uid {user.uid}) cannot reach the state "
            f"directory {state_dir}: {blocked} (its instances' directories are there)"
        )
    spans = os.environ.get(tracing.TRACE_DIR_ENV, "")
    if spans:
        share_dir(Path(spans), user.gid)
    HostTier(tier_prefix(settings.shm_namespace)).share_with(user.gid)
    log.info("agent.handler_user", user=user.name, uid=user.uid, gid=user.gid)
    return user


def uid_range(setting: str) -> range | None:
    """The uids GFAAS_HANDLER_UIDS ("START-END") gives instances, one each; None for
    "". A HandlerUserError for a range that is malformed, reversed, larger than
    65,536 or holds root or this process's uid."""
    if not setting.strip():
        return None
    start, dash, end = setting.strip().partition("-")
    try:
        uids = range(int(start), int(end) + 1) if dash else range(0)
    except ValueError:
        uids = range(0)
    if not uids:
        raise HandlerUserError(
            f"GFAAS_HANDLER_UIDS={setting!r}: give the instances' uids as START-END "
            "(say 200000-200999), START at most END"
        )
    if len(uids) > 65_536 or 0 in uids or os.geteuid() in uids:
        raise HandlerUserError(
            f"GFAAS_HANDLER_UIDS={setting!r}: at most 65,536 uids, none of them root's "
            f"or this worker's ({os.geteuid()})"
        )
    return uids


def share_dir(path: Path, gid: int) -> None:
    """`path`, a directory of this process's user, writable by group `gid` too, setgid
    (what is written there stays the group's) and sticky (a member removes only its
    own files); other users keep what they had. Changed through an fd of the
    directory itself, never through a link."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid():
            os.fchown(fd, -1, gid)
            mode = stat.S_IMODE(info.st_mode) | stat.S_ISGID | stat.S_ISVTX | stat.S_IRWXG
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class InstanceDirs:
    """One agent's instances' working directories: `<state_dir>/instances/<agent>/<id>`,
    each 0700 and the handler user's; the two above root's, 0711 (passable, not
    listable)."""

    root: Path
    user: HandlerUser

    @classmethod
    def under(cls, state_dir: Path, agent_id: str, user: HandlerUser) -> InstanceDirs:
        dirs = cls(state_dir.resolve() / INSTANCES_DIR / agent_id, user)
        dirs.reset()
        return dirs

    def reset(self) -> None:
        """Empty: what a predecessor of this agent left is removed."""
        shutil.rmtree(self.root, ignore_errors=True)
        for directory in (self.root.parent, self.root):
            directory.mkdir(mode=0o711, exist_ok=True)
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o711)
            finally:
                os.close(fd)

    def create(self, instance_id: str, uid: int | None = None) -> Path:
        """The instance's directory, its user's (`uid`: its own, else the handler
        user's) in the handler group."""
        path = self.root / instance_id
        os.mkdir(path, 0o700)
        os.chown(path, self.user.uid if uid is None else uid, self.user.gid, follow_symlinks=False)
        return path

    @staticmethod
    def remove(path: Path) -> None:
        # rmtree works through fds and follows no links the handler left in it.
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def read_own_file(path: Path, limit: int = 1 << 20) -> bytes:
    """A file the handler user wrote in its directory, read as root: never through a
    link it left there (it would read what only root may), at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


# -- the instance side (the assigned process, as root until `become`) ---------------------


def weights_fetcher(models: ModelStore, settings: Settings) -> WeightsFetcher:
    """Where a worker keeps the model files it fetches: the node's cache,
    `<state_dir>/models`. An instance that switched users reads that cache but cannot
    write it (so no handler can change a file the worker's root loads later): what it
    is missing, it fetches into its own directory, which goes with it."""
    cache = settings.state_dir / "models"
    if not settings.instance_dir:
        return lambda name: models.fetch(name, cache)
    own = Path(settings.instance_dir) / "models"

    async def fetch(name: str) -> Path:
        try:
            return await models.fetch(name, cache)
        except PermissionError:
            return await models.fetch(name, own)

    return fetch


def become(settings: Settings) -> Settings:
    """Switch this instance process to the handler user, in its directory
    (`settings.instance_dir`): the settings to serve with, what only root could read
    already read."""
    user = access.handler_user(settings)
    if user is None:
        raise HandlerUserError(
            "assigned an instance directory but no handler user: not root, or "
            f"{access.USER_ENV} is off"
        )
    if settings.instance_uid:
        # A uid of its own (GFAAS_HANDLER_UIDS), in the handler group: no passwd entry.
        user = dataclasses.replace(user, name=str(settings.instance_uid), uid=settings.instance_uid)
    directory = Path(settings.instance_dir)
    settings = read_as_root(settings, directory, user)
    for module in AFTER_SWITCH:
        importlib.import_module(module)
    parent = os.getppid()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        switch_user(user.uid, user.gid)
        os.fchdir(fd)
    finally:
        os.close(fd)
    _die_with(parent)
    os.environ.update(HOME=str(directory), TMPDIR=str(directory), USER=user.name, LOGNAME=user.name)
    return settings


def read_as_root(settings: Settings, directory: Path, user: HandlerUser) -> Settings:
    """The settings with what the handler user may not read resolved now: the NATS
    credentials file read into user and password, the CA file copied to `directory`."""
    if settings.nats_creds:
        from shared.auth import Credentials

        creds = Credentials.load(settings.nats_creds)
        if not creds.tenant:  # a tenant's file also names its inbox: keep reading that
            settings = dataclasses.replace(
                settings, nats_creds="", nats_user=creds.user, nats_password=creds.password
            )
    if settings.nats_tls_ca:
        copy = directory / CA_COPY
        data = Path(settings.nats_tls_ca).read_bytes()
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fchown(fd, user.uid, user.gid)
        finally:
            os.close(fd)
        settings = dataclasses.replace(settings, nats_tls_ca=str(copy))
    return settings


def _die_with(parent: int) -> None:
    """SIGTERM when the agent dies, again: switching users cleared it."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before: nobody would stop this process
        os._exit(0)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
