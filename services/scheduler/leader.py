"""Which of the running schedulers is active: the one holding a lease in JetStream KV.

The lease is the key `scheduler` of bucket gfaas_leader, whose entries expire
`ttl_s` after they were last written. The holder renews it well inside that (a
compare-and-set on its own revision, so a holder that lost it learns so); the
others try to create it, which succeeds only once it has expired or been deleted.
A standby therefore takes over within about `ttl_s` of the active one's death, and
at once when it stops cleanly (it deletes the key). Two schedulers are never active
together for longer than a renewal that fails: a holder that cannot renew for
`ttl_s` steps down by itself. A holder whose renewal comes after its lease has
lapsed (its loop stalled for a TTL on a loaded machine) creates it again at once,
which succeeds only if no one took it meanwhile: then it goes on leading, and what
it held is not handed over for nothing.
"""

from __future__ import annotations

import time
from typing import Final

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.logs import get_logger

log = get_logger("scheduler.leader")

KEY: Final = "scheduler"


class Leadership:
    def __init__(self, kv: KeyValue, me: str, ttl_s: float) -> None:
        self.kv = kv
        self.me = me
        self.ttl_s = ttl_s
        self.active = False
        self.revision = 0
        self.renewed_at = 0.0
        self.terms = 0
        # Leases that lapsed while held and were retaken before anyone else took them.
        self.lapses = 0

    async def keep(self) -> bool:
        """Renew the lease, or try to take it; True while this scheduler is active."""
        now = time.monotonic()
        try:
            if self.active:
                self.revision = await self.kv.update(KEY, self.me.encode(), last=self.revision)
            else:
                self.revision = await self.kv.create(KEY, self.me.encode())
                self.active = True
                self.terms += 1
            self.renewed_at = now
        except KeyWrongLastSequenceError:
            if self.active and await self._retake():
                # It lapsed (a renewal later than the TTL: this loop stalled) and no
                # one took it: still ours, and what waits here is not handed over.
                log.warning("leader.retaken", scheduler=self.me)
                self.renewed_at = now
            else:
                if self.active:
                    log.warning("leader.lost", scheduler=self.me)
                self.active = False
        except Exception as exc:  # unreachable, no stream leader for a moment, ...
            # Cannot tell: keep acting on what we knew, but never past the lease.
            if self.active and now - self.renewed_at > self.ttl_s:
                log.warning("leader.unrenewable", scheduler=self.me, error=repr(exc))
                self.active = False
        return self.active

    async def _retake(self) -> bool:
        """Create the lease anew: succeeds only where no one holds it now."""
        try:
            self.revision = await self.kv.create(KEY, self.me.encode())
        except Exception:  # another holds it (or cannot tell): step down
            return False
        self.lapses += 1
        return True

    async def resign(self) -> None:
        """Let a standby take over now instead of after the lease runs out."""
        if not self.active:
            return
        self.active = False
        try:
            await self.kv.delete(KEY, last=self.revision)
        except Exception as exc:  # it lapses by itself: a failed delete costs a timeout
            log.info("leader.resign_failed", scheduler=self.me, error=repr(exc))
