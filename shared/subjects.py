"""Every NATS subject gfaas uses, built in one place. Version is part of the subject."""

from __future__ import annotations

from typing import Final

from shared.names import check_name
from shared.schema import SCHEMA_VERSION, is_valid_token

PREFIX: Final = f"gfaas.{SCHEMA_VERSION}"

INVOKE_ALL: Final = f"{PREFIX}.invoke.*"
INVOKE_ASYNC_ALL: Final = f"{PREFIX}.invoke_async.*"
SCHEDULE: Final = f"{PREFIX}.schedule"
# Done notes: `done.scheduler.<origin>` for invocations the scheduler sent (the
# ingress they came through hears its own), `done.<ingress>` for those an ingress sent
# directly under a grant. The scheduler hears all of them.
DONE_ALL: Final = f"{PREFIX}.done.>"
DONE_SCHEDULED: Final = f"{PREFIX}.done.scheduler"
# Every active and standby scheduler says it is alive (shared.schema.SchedulerBeat).
SCHEDULER_ALIVE: Final = f"{PREFIX}.scheduler_alive"
# Async invocations that can never succeed, with the reason in headers.
DEAD_ALL: Final = f"{PREFIX}.dead.>"
WORKER_LOST: Final = f"{PREFIX}.worker_lost"
# Liveness of an ingress instance (empty body, every heartbeat_s): when it stops, the
# broker drops the references it held and the scheduler takes back its grants.
ALIVE_ALL: Final = f"{PREFIX}.alive.*"
# An ingress gives a grant back (it lapsed or was revoked, and nothing sent under
# it is still running): the scheduler frees the slots.
GRANT_RETURN: Final = f"{PREFIX}.grant_return"
# Request-reply: a worker at capacity hands back an invocation the scheduler placed
# there (shared.schema.Refused); the active scheduler alone listens (queue group).
REFUSED: Final = f"{PREFIX}.refused"
# Request-reply: a deploy has a worker dry-run a function's handler in a sandbox
# (shared.schema.HandlerCheck); any one worker answers (queue group).
HANDLER_CHECK: Final = f"{PREFIX}.handler_check"
HEARTBEAT_ALL: Final = f"{PREFIX}.heartbeat.*"
RESULT_ALL: Final = f"{PREFIX}.result.*"

# Queue groups: replicas of one service share the load of these subscriptions.
Q_INGRESS: Final = "gfaas-ingress"
Q_SCHEDULER: Final = "gfaas-scheduler"
Q_WORKERS: Final = "gfaas-workers"
Q_AGENTS: Final = "gfaas-agents"


def _tok(value: str) -> str:
    if not is_valid_token(value):
        raise ValueError(f"{value!r} is not a valid subject token")
    return value


def _name(function: str) -> str:
    # A function's (or workflow's) name, as shared.names has every name: an
    # InvalidName (a ValueError) names what is wrong with it.
    check_name("function", function)
    return function


def invoke(function: str) -> str:
    return f"{PREFIX}.invoke.{_name(function)}"


def invoke_async(function: str) -> str:
    return f"{PREFIX}.invoke_async.{_name(function)}"


def worker_run(worker_id: str) -> str:
    return f"{PREFIX}.worker.{_tok(worker_id)}.run"


def done(ingress_id: str) -> str:
    return f"{PREFIX}.done.{_tok(ingress_id)}"


def done_scheduled(origin: str) -> str:
    """A Done for an invocation the scheduler placed; `origin` is the ingress it came
    through ("" when unknown: the scheduler alone hears it)."""
    return f"{DONE_SCHEDULED}.{_tok(origin)}" if origin else f"{DONE_SCHEDULED}._"


def is_scheduled_done(subject: str) -> bool:
    return subject.startswith(DONE_SCHEDULED + ".")


def dead_letter(function: str) -> str:
    """Where a dead async invocation is kept; `_` when its subject named no function."""
    return f"{PREFIX}.dead.{function if is_valid_token(function) else '_'}"


def echo(instance: str) -> str:
    """A service's message to itself: does the bus still carry its messages?"""
    return f"{PREFIX}.echo.{_tok(instance)}"


def alive(instance: str) -> str:
    return f"{PREFIX}.alive.{_tok(instance)}"


def grants(ingress_id: str) -> str:
    """Where the scheduler sends one ingress instance its grants (shared.schema.Grant)."""
    return f"{PREFIX}.ingress.{_tok(ingress_id)}.grant"


def heartbeat(worker_id: str) -> str:
    return f"{PREFIX}.heartbeat.{_tok(worker_id)}"


# Node agents (issue 8): each says what its device holds on `agent_beat.<agent>`, and
# takes the scheduler's commands (start, stop) and its instances' token requests
# (acquire, release) on `agent.<agent>.<op>`.
AGENT_BEAT_ALL: Final = f"{PREFIX}.agent_beat.*"
# Request-reply: an agent measures a function on its device (shared.schema.Profile),
# stores it in KV gfaas_profiles and says so on `profiled.<function>`.
PROFILE: Final = f"{PREFIX}.profile"
PROFILED_ALL: Final = f"{PREFIX}.profiled.*"


def profiled(function: str) -> str:
    return f"{PREFIX}.profiled.{_tok(function)}"


def agent_beat(agent_id: str) -> str:
    return f"{PREFIX}.agent_beat.{_tok(agent_id)}"


def agent(agent_id: str, op: str) -> str:
    """op: start, stop (request-reply, the scheduler); acquire and weights
    (request-reply), release and failed (notes), the agent's instances."""
    return f"{PREFIX}.agent.{_tok(agent_id)}.{_tok(op)}"


def agent_all(agent_id: str) -> str:
    """Every operation of one agent."""
    return f"{PREFIX}.agent.{_tok(agent_id)}.*"


# Failed invocations (shared.schema.FailureRecord), by function; `_` for a name that
# is not a token. Kept in stream GFAAS_LOGS for `gfaas logs`.
LOGS_ALL: Final = f"{PREFIX}.logs.*"


def logs(function: str) -> str:
    return f"{PREFIX}.logs.{function if is_valid_token(function) else '_'}"


def result(invocation_id: str) -> str:
    return f"{PREFIX}.result.{_tok(invocation_id)}"


def status(service: str) -> str:
    """Request-reply: any instance of `service` answers with a ServiceStatus."""
    return f"{PREFIX}.status.{_tok(service)}"


def broker(node: str, op: str) -> str:
    """The node's memory broker: op is lease, check, retain, release, transfer, park,
    unpark, copy or read."""
    return f"{PREFIX}.broker.{_tok(node)}.{_tok(op)}"


def broker_all(node: str) -> str:
    """Every operation of the node's memory broker (it serves them in arrival order)."""
    return f"{PREFIX}.broker.{_tok(node)}.*"


def last_token(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]
