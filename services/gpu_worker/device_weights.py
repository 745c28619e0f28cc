"""Shared read-only weights on a GPU, over the bus: a CUDA instance asks its agent
for the device's one copy of its model (`weights`, request-reply); the agent makes
it once per model and device, exports it over CUDA IPC, and holds it for the
instance until its process has exited (shared.modelswap.device_share).

On a CPU nothing is asked: the host tier's shared memory is the copy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from shared import subjects
from shared.errors import GfaasError, clipped, described
from shared.logs import get_logger
from shared.modelswap import HostModel
from shared.modelswap.device_share import DeviceCopies, ShareError
from shared.schema import (
    DeviceWeights,
    ErrorCode,
    ErrorInfo,
    WeightsReply,
    WeightsRequest,
    decode,
    encode,
)

log = get_logger("gpu_worker.device_weights")

# How long an instance waits for its agent's copy: the agent may first fill the
# host tier from the object store (a large model: seconds), then copy it once.
WEIGHTS_TIMEOUT_S = 300.0


def asker(
    nc: NATS, agent_id: str, instance_id: str, timeout_s: float = WEIGHTS_TIMEOUT_S
) -> Callable[[str], Awaitable[DeviceWeights]]:
    """What an instance's handler cache calls for its model's device copy."""
    subject = subjects.agent(agent_id, "weights")

    async def ask(model: str) -> DeviceWeights:
        request = encode(WeightsRequest(instance_id=instance_id, model=model))
        try:
            msg = await nc.request(subject, request, timeout=timeout_s)
        except (NatsTimeout, TimeoutError):
            raise GfaasError(
                ErrorCode.UNAVAILABLE,
                f"agent {agent_id} gave no device copy of {model!r} in {timeout_s:.0f} s",
            ) from None
        reply = decode(msg.data, WeightsReply)
        if reply.error is not None:
            raise GfaasError(reply.error.code, reply.error.reason)
        if reply.weights is None:
            raise GfaasError(ErrorCode.INTERNAL, f"agent {agent_id} answered with no copy")
        return reply.weights

    return ask


async def answer(
    msg: Msg,
    copies: DeviceCopies | None,
    holder_model: Callable[[str], str | None],
    host_model: Callable[[str], Awaitable[HostModel]],
    device: str,
) -> None:
    """The agent's side: `msg` asks for a device copy. Only for an instance of this
    agent (`holder_model` says which model it was started with: None for none) and
    its own model."""
    try:
        request = decode(msg.data, WeightsRequest)
        model = holder_model(request.instance_id)
        if copies is None:
            raise GfaasError(ErrorCode.BAD_REQUEST, f"{device} shares no device copies")
        if model is None or model != request.model:
            raise GfaasError(
                ErrorCode.NOT_FOUND,
                f"no instance {request.instance_id} of model {request.model!r} here",
            )
        host = await host_model(request.model)
        weights = await anyio.to_thread.run_sync(copies.hold, request.instance_id, host, device)
        if holder_model(request.instance_id) is None:
            # Its process exited while the copy was made: the reap that would have
            # released its hold came first, so release it here.
            await anyio.to_thread.run_sync(copies.release, request.instance_id)
            raise GfaasError(ErrorCode.NOT_FOUND, f"instance {request.instance_id} is gone")
        reply = WeightsReply(weights=weights)
        log.info(
            "weights.shared",
            instance=request.instance_id,
            model=request.model,
            bytes=weights.nbytes,
            copies=copies.made,
        )
    except GfaasError as exc:
        reply = WeightsReply(error=exc.info())
    except ShareError as exc:
        reply = WeightsReply(
            error=ErrorInfo(code=ErrorCode.MODEL_UNAVAILABLE, reason=clipped(str(exc)))
        )
    except Exception as exc:  # the device's fault, not the asker's: say what it was
        log.exception("weights.failed")
        reason = f"no device copy: {described(exc)}"
        reply = WeightsReply(error=ErrorInfo(code=ErrorCode.INTERNAL, reason=reason))
    if msg.reply:
        await msg.respond(encode(reply))
