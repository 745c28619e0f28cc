"""The one exception type that carries a wire error code."""

from __future__ import annotations

from shared.schema import ErrorCode, ErrorInfo


class GfaasError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    @classmethod
    def from_info(cls, info: ErrorInfo) -> GfaasError:
        return cls(info.code, info.reason)

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, reason=self.reason)


def bad_request(reason: str) -> GfaasError:
    """The caller's input is wrong, and `reason` says how."""
    return GfaasError(ErrorCode.BAD_REQUEST, reason)
