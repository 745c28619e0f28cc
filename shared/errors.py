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


# The most characters of an exception's own words that a reason quotes: enough for
# what a user acts on (no room in /dev/shm for a segment of N bytes, a checksum that
# did not match, the torch error for a file that is not a checkpoint), not a page.
REASON_CHARS = 500


def described(exc: BaseException, limit: int = REASON_CHARS) -> str:
    """`exc` as a reason quotes it: its type and its message on one line (no
    traceback), cut to `limit` characters; a GfaasError as its code and reason."""
    if isinstance(exc, GfaasError):
        text = f"{exc.code}: {exc.reason}"
    else:
        message = str(exc)
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return clipped(text, limit)


def clipped(text: str, limit: int = REASON_CHARS) -> str:
    """`text` (words from elsewhere: a message, a process's output) as a reason quotes
    it: on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    if len(text) > limit:
        cut = text[: max(0, limit - 40)].rstrip()
        text = f"{cut} ... ({len(text) - len(cut)} more characters cut)"
    return text
