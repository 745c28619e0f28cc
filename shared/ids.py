"""Who holds what: the names of lease holders, built, parsed and compared here only.

A lease's references are counted per holder name (shared.dataplane.leases). Three
kinds of name exist:

- a process: an ingress instance (`ingress-<12 hex>`) or a worker (its worker id);
  the broker drops every reference a process held once it falls silent;
- a workflow run inside an ingress (`<ingress>/wf-<run id>`, `new_run_id`): dropped with
  the ingress that runs it;
- an invocation's own outputs, when its caller named no holder (`inv-<id>`): only
  their TTL frees them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from shared.schema import new_invocation_id

RUN_SEPARATOR: Final = "/"
# Stage invocation ids (`<run>-<stage>`) must stay single tokens of <= 64 characters.
RUN_ID_CHARS: Final = 48
# Random hex digits that make a workflow run's id its own (`new_run_id`).
RUN_ID_SUFFIX: Final = 10


@dataclass(frozen=True, slots=True)
class Holder:
    owner: str  # the process, or "" for an invocation's own outputs
    run: str = ""  # a workflow run inside `owner`
    invocation: str = ""  # set for an invocation's own outputs

    @classmethod
    def new_ingress(cls) -> Holder:
        return cls(owner=f"ingress-{new_invocation_id()[:12]}")

    @classmethod
    def of_invocation(cls, invocation_id: str) -> Holder:
        return cls(owner="", invocation=invocation_id)

    def workflow_run(self, run_id: str) -> Holder:
        """The holder of one workflow run's intermediates, under this process
        (`run_id`: the run's own, `new_run_id`)."""
        return Holder(owner=self.owner, run=f"wf-{run_id[:RUN_ID_CHARS]}")

    @classmethod
    def parse(cls, name: str) -> Holder:
        if name.startswith("inv-") and RUN_SEPARATOR not in name:
            return cls(owner="", invocation=name.removeprefix("inv-"))
        owner, _, run = name.partition(RUN_SEPARATOR)
        return cls(owner=owner, run=run)

    def __str__(self) -> str:
        if self.invocation:
            return f"inv-{self.invocation}"
        if self.run:
            return f"{self.owner}{RUN_SEPARATOR}{self.run}" if self.owner else self.run
        return self.owner

    def owned_by(self, process: str) -> bool:
        """Does this name's reference go when `process` dies?"""
        return bool(self.owner) and self.owner == process


def new_run_id(invocation_id: str) -> str:
    """A workflow run's own id, for its stages' invocation ids and its holder: the
    caller's invocation id (cut, so that it reads as the run's in logs and traces)
    and random digits. Callers may reuse an invocation id (a correlation id, a retry
    while the first run still goes), and two runs under one id must not share their
    stages' ids or the holder of their leases."""
    keep = RUN_ID_CHARS - RUN_ID_SUFFIX - 1
    return f"{invocation_id[:keep]}-{os.urandom(RUN_ID_SUFFIX // 2).hex()}"


def output_holder(requested: str, invocation_id: str) -> str:
    """Who holds an invocation's by-handle outputs: the caller's named holder, else the
    invocation itself."""
    return requested or str(Holder.of_invocation(invocation_id))
