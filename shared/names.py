"""Names of functions, workflows, models and tenants: one pattern, checked wherever a
name enters (spec, KV key, object name, subject, file path).

A name is at once one NATS subject token (`gfaas.v1.invoke.<function>`), one KV key,
one object-store name and one file name (the worker's model cache), so it may hold
none of what any of those treats specially: no `.` (a subject's separator, and `..`
in a path), no `/`, no spaces, no NATS wildcards `*` and `>`. Function names always
had this shape; models and tenants have it now too.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec

Kind = Literal["function", "workflow", "stage", "model", "tenant"]

# 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit.
NAME_PATTERN: Final = "[a-z0-9][a-z0-9_-]{0,62}"
_NAME: Final = re.compile(NAME_PATTERN)

# For msgspec fields: `name: Name` refuses a bad name when decoding.
Name = Annotated[str, msgspec.Meta(pattern=f"^{NAME_PATTERN}\\Z")]


class InvalidName(ValueError):
    """A name that does not match NAME_PATTERN; the message says which and why."""

    def __init__(self, kind: str, name: object) -> None:
        super().__init__(name_problem(kind, name))
        self.kind = kind
        self.name = name


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def name_problem(kind: str, name: object) -> str:
    """The sentence a refusal of `name` as a `kind` name carries."""
    return (
        f"{kind} name {name!r} must match {NAME_PATTERN}: 1-63 characters of a-z, 0-9, "
        "'_' and '-', starting with a letter or digit; it is one subject token, KV key "
        "and file name, so no '.', '/', spaces or the NATS wildcards '*' and '>'"
    )


def check_name(kind: Kind, name: object) -> None:
    """Raise InvalidName (a ValueError) unless `name` is a valid `kind` name."""
    if not is_valid_name(name):
        raise InvalidName(kind, name)
