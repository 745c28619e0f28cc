"""Who besides their creator may open the node's shared segments: the handler group.

When the services run as root and `GFAAS_HANDLER_USER` names a user (by default
`auto`: nobody, where it can reach what an instance needs, see `resolve`), instance
processes run as that user (services/gpu_worker/privileges.py) and must still map
what the services make for them: the broker's pool slabs (read and written), its
lease board and the host tier's model segments (read). Those are then created
owned by their root creator and the handler group (`GFAAS_HANDLER_GROUP`, else the
user's primary group), with only the group bits each needs (0660 or 0640), so that
no other user of the node can map them. Without a handler user, or in a process
that is not root (which could neither switch users nor give files away), segments
stay 0600 to their creator, as they always were.

The group is one setting per process, since segments are made deep inside the
backends: a worker sets it at start (`share_segments`); any other process (the
broker under `gfaas up` or compose) reads it from its environment at its first
segment, the same GFAAS_* variables the worker's settings came from.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings, settings_from_env
from shared.logs import get_logger

log = get_logger("access")

USER_ENV = "GFAAS_HANDLER_USER"
GROUP_ENV = "GFAAS_HANDLER_GROUP"
# Values of GFAAS_HANDLER_USER that mean "instances run as the agent's user".
OFF = frozenset({"", "none"})
# The default: nobody when the node's layout lets it run a handler, else the agent's
# own user, said in the log and the agent's status (`auto_off`).
AUTO = "auto"
AUTO_USER = "nobody"

# Group permission bits a segment may grant the handler group.
GROUP_READ = 0o040
GROUP_RW = 0o060


class HandlerUserError(ValueError):
    """The configured handler user or group cannot be used (the message says why)."""


@dataclass(frozen=True)
class HandlerUser:
    name: str
    uid: int
    gid: int  # the group instances run with and the services share segments with

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "uid": self.uid, "gid": self.gid}


def resolve(user: str, group: str = "", *, needs: Iterable[Path] = ()) -> HandlerUser | None:
    """The handler user `user` (a name or a uid) names, with `group` (a name or a gid;
    "": the user's primary group). None when it is off, or when this process is not
    root: only root can switch to it. Raises HandlerUserError naming what is wrong.

    `auto` is nobody when it can reach every directory of `needs` (what an instance
    reads after its switch: the state directory, the interpreter's libraries, the
    handler packages), else None: a node whose interpreter lives in root's 0700 home
    cannot run handlers as nobody, and says so (`auto_off`) instead of failing."""
    name = user.strip()
    if name.lower() in OFF or os.geteuid() != 0:
        return None
    if name.lower() == AUTO:
        return _auto(group, needs)
    entry = _passwd(name)
    gid = _group_id(group.strip()) if group.strip() else entry.pw_gid
    if entry.pw_uid == 0:
        raise HandlerUserError(
            f"{USER_ENV}={name!r} is root: handlers would keep every privilege "
            f"(name an unprivileged user, or none to run them as the agent's user)"
        )
    if gid == 0:
        raise HandlerUserError(
            f"the handler group of {name!r} is root's (gid 0): set {GROUP_ENV} to a group "
            f"of its own, which the node's shared memory is then opened to"
        )
    return HandlerUser(entry.pw_name, entry.pw_uid, gid)


_auto_off: str | None = None


def auto_off() -> str | None:
    """Why `auto` left handlers as this process's user, or None."""
    return _auto_off


def _auto(group: str, needs: Iterable[Path]) -> HandlerUser | None:
    global _auto_off
    try:
        user = resolve(AUTO_USER, group)
    except HandlerUserError as exc:
        _auto_off = str(exc)
        return None
    assert user is not None  # root here
    for path in needs:
        blocked = unreachable(path, user, read=True)
        if blocked is not None:
            _auto_off = f"{AUTO_USER} cannot read {path}: {blocked}"
            return None
    _auto_off = None
    return user


def unreachable(path: Path, user: HandlerUser, *, read: bool = False) -> str | None:
    """The first directory on the way to `path` (itself included) that `user`, with its
    group alone, may not enter (with `read`: nor list `path`), described; None when it
    can. A path that does not exist yet is judged by its nearest existing directory.
    (Mode bits only: an ACL could say otherwise.)"""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        if info.st_uid == user.uid:
            bits = stat.S_IXUSR | (stat.S_IRUSR if read and directory == path else 0)
        elif info.st_gid == user.gid:
            bits = stat.S_IXGRP | (stat.S_IRGRP if read and directory == path else 0)
        else:
            bits = stat.S_IXOTH | (stat.S_IROTH if read and directory == path else 0)
        if info.st_mode & bits != bits:
            return f"{directory} is {stat.filemode(info.st_mode)} {info.st_uid}:{info.st_gid}"
    return None


def instance_reads(settings: Settings) -> list[Path]:
    """What an instance process reads after it switched users: the state directory
    (its own directory is there), the interpreter's standard library and site
    packages (modules imported lazily), and each handler package's directory."""
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")}
    needs = [settings.state_dir, *(Path(p) for p in sorted(paths))]
    for package in filter(None, (p.strip() for p in settings.handler_packages.split(","))):
        try:
            spec = importlib.util.find_spec(package)  # no import: only where it lies
        except (ImportError, ValueError):
            continue  # not on this node: nothing of it is read
        if spec is not None and spec.submodule_search_locations:
            needs += [Path(p) for p in spec.submodule_search_locations]
    return needs


def handler_user(settings: Settings) -> HandlerUser | None:
    needs = instance_reads(settings) if settings.handler_user.strip().lower() == AUTO else ()
    return resolve(settings.handler_user, settings.handler_group, needs=needs)


def _passwd(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise HandlerUserError(
            f"{USER_ENV}={name!r}: there is no such user on this node (name an existing "
            f"unprivileged user, such as nobody, or none to run handlers as the agent's user)"
        ) from None


def _group_id(group: str) -> int:
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        reason = f"{GROUP_ENV}={group!r}: there is no such group on this node"
        raise HandlerUserError(reason) from None


# -- the process's segment group ---------------------------------------------------------

_group: int | None = None
_configured = False


def share_segments(user: HandlerUser | None) -> None:
    """Segments this process creates from now on are shared with `user`'s group (None:
    with no one)."""
    global _group, _configured
    _group, _configured = (user.gid if user is not None else None), True


def from_environ(env: Mapping[str, str]) -> HandlerUser | None:
    # The worker's settings from the same variables: the same answer, `auto` included.
    return handler_user(settings_from_env(env))


def segment_group() -> int | None:
    """The gid segments are shared with, or None: as `share_segments` said, else as
    this process's environment says (read once)."""
    if not _configured:
        share_segments(from_environ(os.environ))
    return _group
