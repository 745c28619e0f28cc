"""A handler module that says, as it is imported, who imports it: its ids and groups,
its working directory's owner and mode, its HOME, and which secrets its environment
holds. It raises, so the deploy's sandbox refuses it with that line as the reason
(tests/test_handler_user.py reads it there)."""

from __future__ import annotations

import os
import stat

_cwd = os.stat(".")
_secrets = sorted(k for k in os.environ if any(w in k for w in ("CREDS", "PASSWORD", "TOKEN")))
raise RuntimeError(
    f"ids {os.getuid()} {os.geteuid()} {os.getgid()} groups {os.getgroups()} "
    f"cwd {_cwd.st_uid} {stat.S_IMODE(_cwd.st_mode):o} {os.getcwd()} "
    f"home {os.environ.get('HOME', '')} secrets {_secrets}"
)
