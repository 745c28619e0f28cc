"""Records of invocations by id, where callers may reuse an id.

An invocation id is the caller's to choose (`Gfaas-Invocation-Id`, a correlation
id, a retry while the first attempt still runs), so two records may share one. Each
is kept under a key of its own (the id, or `id#n` while another under the id is
kept), and a worker's Done note names its record by the id and the reply subject
the invocation came with (`Done.reply`). Most ids are one record's: a look-up by
id and reply takes no scan then.
"""

from __future__ import annotations

import itertools
from collections.abc import ItemsView, Iterator, ValuesView
from typing import Generic, Protocol, TypeVar


class Record(Protocol):
    @property
    def invocation_id(self) -> str: ...

    @property
    def reply(self) -> str: ...


R = TypeVar("R", bound=Record)


class ByInvocation(Generic[R]):
    """Records in the order they were added, each under a key of its own."""

    def __init__(self) -> None:
        self._records: dict[str, R] = {}
        # Numbers the keys of records that share an id; how many are kept under each.
        self._seq = itertools.count()
        self._under: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def items(self) -> ItemsView[str, R]:
        return self._records.items()

    def values(self) -> ValuesView[R]:
        return self._records.values()

    def add(self, record: R) -> str:
        """Keep `record`; its key (for `get` and `pop`)."""
        key = record.invocation_id
        if key in self._records:
            key = f"{key}#{next(self._seq)}"  # '#' is no id's character
        self._records[key] = record
        self._under[record.invocation_id] = self._under.get(record.invocation_id, 0) + 1
        return key

    def get(self, key: str) -> R | None:
        return self._records.get(key)

    def pop(self, key: str) -> R | None:
        """The record under `key`, removed; None if there is none (any more)."""
        record = self._records.pop(key, None)
        if record is None:
            return None
        left = self._under[record.invocation_id] - 1
        if left:
            self._under[record.invocation_id] = left
        else:
            del self._under[record.invocation_id]
        return record

    def done(self, invocation_id: str, reply: str) -> R | None:
        """The record a Done note names (its id and reply subject), removed; None for
        a note of no record here (another caller's subject, or "": a request whose
        inbox these books never knew)."""
        if not reply or invocation_id not in self._under:
            return None
        record = self._records.get(invocation_id)
        if record is not None and record.invocation_id == invocation_id and record.reply == reply:
            return self.pop(invocation_id)
        if self._under[invocation_id] > 1 or record is None:
            for key, r in self._records.items():
                if r.invocation_id == invocation_id and r.reply == reply:
                    return self.pop(key)
        return None
