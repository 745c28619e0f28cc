"""Who holds what: the names of lease holders, built, parsed and compared here only.

A lease's references are counted per holder name (shared.dataplane.leases). Three
kinds of name exist:

- a process: an ingress instance (`ingress-<12 hex>`) or a worker (its worker id);
  the broker drops every reference a process held once it falls silent;
- a workflow run inside an ingress (`<ingress>/wf-<invocation id>`): dropped with
  the ingress that runs it;
- an invocation's own outputs, when its caller named no holder (`inv-<id>`): only
  their TTL frees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from shared.schema import new_invocation_id

RUN_SEPARATOR: Final = "/"
# Stage invocation ids (`<run>-<stage>`) must stay single tokens of <= 64 characters.
RUN_ID_CHARS: Final = 48


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

    def workflow_run(self, invocation_id: str) -> Holder:
        """The holder of one workflow run's intermediates, under this process."""
        return Holder(owner=self.owner, run=f"wf-{invocation_id[:RUN_ID_CHARS]}")

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


def output_holder(requested: str, invocation_id: str) -> str:
    """Who holds an invocation's by-handle outputs: the caller's named holder, else the
    invocation itself."""
    return requested or str(Holder.of_invocation(invocation_id))
