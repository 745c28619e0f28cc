"""Who besides their creator may open the node's shared segments: the handler group.

When the services run as root and `GFAAS_HANDLER_USER` names a user, instance
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
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import Settings

USER_ENV = "GFAAS_HANDLER_USER"
GROUP_ENV = "GFAAS_HANDLER_GROUP"
# Values of GFAAS_HANDLER_USER that mean "instances run as the agent's user".
OFF = frozenset({"", "none"})

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


def resolve(user: str, group: str = "") -> HandlerUser | None:
    """The handler user `user` (a name or a uid) names, with `group` (a name or a gid;
    "": the user's primary group). None when it is off, or when this process is not
    root: only root can switch to it. Raises HandlerUserError naming what is wrong."""
    name = user.strip()
    if name.lower() in OFF or os.geteuid() != 0:
        return None
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


def handler_user(settings: Settings) -> HandlerUser | None:
    return resolve(settings.handler_user, settings.handler_group)


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
    return resolve(env.get(USER_ENV, ""), env.get(GROUP_ENV, ""))


def segment_group() -> int | None:
    """The gid segments are shared with, or None: as `share_segments` said, else as
    this process's environment says (read once)."""
    if not _configured:
        share_segments(from_environ(os.environ))
    return _group
