"""structlog set-up: key-value lines for people, JSON for machines; and the one way a
failed invocation is logged (`report_failure`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable

import structlog
from opentelemetry import trace

from shared import subjects, tracing
from shared.schema import DEFAULT_TENANT, ErrorCode, FailureRecord, encode, now_millis


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            tracing.log_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    logging.getLogger("asyncio").addFilter(_quiet_tls_eof)


def _quiet_tls_eof(record: logging.LogRecord) -> bool:
    """Drop asyncio's warning that nats-py's protocol returns True from `eof_received`
    on a TLS connection: harmless (asyncio closes it anyway), and said once for every
    connection's end, which over TLS buried every other line."""
    return "eof_received() has no effect when using ssl" not in record.getMessage()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


# -- failed invocations -------------------------------------------------------------------

# Publishes one message (a Bus's `publish`, or nats' `publish`).
Publish = Callable[[str, bytes], Awaitable[object]]


def current_trace_id() -> str:
    """The trace id of the current span, 32 hex digits ("" outside any trace)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def failure_record(
    *,
    function: str,
    invocation_id: str,
    tenant: str,
    code: ErrorCode,
    reason: str,
    traceback: str = "",
    service: str = "",
    instance: str = "",
) -> FailureRecord:
    return FailureRecord(
        function=function,
        invocation_id=invocation_id,
        tenant=tenant or DEFAULT_TENANT,
        code=code,
        reason=reason,
        trace_id=current_trace_id(),
        traceback=traceback,
        service=service,
        instance=instance,
        at_ms=now_millis(),
    )


async def report_failure(
    logger: structlog.stdlib.BoundLogger, publish: Publish, record: FailureRecord
) -> None:
    """Log a failed invocation (once, where its outcome was decided) and publish it on
    `gfaas.v1.logs.<function>` for `gfaas logs`. A failed publish costs only the copy
    on the bus."""
    fields: dict[str, object] = {
        "function": record.function,
        "tenant": record.tenant,
        "invocation_id": record.invocation_id,
        "trace_id": record.trace_id,
        "code": str(record.code),
        "reason": record.reason,
    }
    if record.traceback:
        # structlog's key for a formatted traceback: printed below the line.
        fields["exception"] = record.traceback
    logger.error("invocation.failed", **fields)
    try:
        await publish(subjects.logs(record.function), encode(record))
    except Exception as exc:  # the bus is down: the log line above is what remains
        logger.warning("invocation.failure_not_published", error=repr(exc))
