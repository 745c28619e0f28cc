"""JetStream resources gfaas keeps: names and idempotent creation.

- stream GFAAS_INVOCATIONS: async invocations (work queue, deduplicated by Nats-Msg-Id)
- KV gfaas_functions: the function registry
- KV gfaas_workflows: the workflow registry
- KV gfaas_results: async results, kept for RESULT_TTL_S
- object store gfaas_models: model weights
- object store gfaas_code: code bundles (shared/codebundle.py), one object per digest
- stream GFAAS_DEAD_LETTERS: async invocations that can never succeed, with the reason
- KV gfaas_profiles: functions' measured profiles (gfaas profile)
- KV gfaas_leader: the active scheduler's lease (entries live LEADER_TTL_S unrenewed)
- stream GFAAS_LOGS: the last failed invocations (FailureRecord), for `gfaas logs`

Each is created with `replicas` copies (`Settings.js_replicas`, 3 on a three-node
cluster); one that exists is used as it is.
"""

from __future__ import annotations

from typing import Final

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared import subjects

INVOCATIONS_STREAM: Final = "GFAAS_INVOCATIONS"
ASYNC_CONSUMER: Final = "gfaas-ingress-async"
FUNCTIONS_BUCKET: Final = "gfaas_functions"
WORKFLOWS_BUCKET: Final = "gfaas_workflows"
RESULTS_BUCKET: Final = "gfaas_results"
PROFILES_BUCKET: Final = "gfaas_profiles"
MODELS_BUCKET: Final = "gfaas_models"
CODE_BUCKET: Final = "gfaas_code"
DEAD_LETTER_STREAM: Final = "GFAAS_DEAD_LETTERS"
LEADER_BUCKET: Final = "gfaas_leader"
DEDUP_WINDOW_S: Final = 120.0
RESULT_TTL_S: Final = 3600.0
DEAD_LETTER_AGE_S: Final = 7 * 24 * 3600.0
LOGS_STREAM: Final = "GFAAS_LOGS"
LOGS_MAX_MSGS: Final = 10_000
LOGS_AGE_S: Final = 7 * 24 * 3600.0


async def ensure_invocations_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    config = StreamConfig(
        name=INVOCATIONS_STREAM,
        subjects=[subjects.INVOKE_ASYNC_ALL],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DEDUP_WINDOW_S,
        max_age=24 * 3600.0,
        num_replicas=replicas,
    )
    await _stream(js, config)


async def _stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another config (an older deployment): bring it to ours.
        await js.update_stream(config)


async def _key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.create_key_value(config)
    except BadRequestError:
        # Exists with another config (say another replica count, made by a client that
        # was not told the cluster's): use it as it is rather than fail.
        return await js.key_value(config.bucket)


async def functions_kv(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    return await _key_value(
        js, KeyValueConfig(bucket=FUNCTIONS_BUCKET, history=1, replicas=replicas)
    )


async def workflows_kv(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    return await _key_value(
        js, KeyValueConfig(bucket=WORKFLOWS_BUCKET, history=1, replicas=replicas)
    )


async def profiles_kv(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """Each function's measured profile (shared.schema.Profile), by function name."""
    return await _key_value(
        js, KeyValueConfig(bucket=PROFILES_BUCKET, history=1, replicas=replicas)
    )


async def results_kv(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    return await _key_value(
        js,
        KeyValueConfig(bucket=RESULTS_BUCKET, history=1, ttl=RESULT_TTL_S, replicas=replicas),
    )


async def models_store(js: JetStreamContext, *, replicas: int = 1) -> ObjectStore:
    config = ObjectStoreConfig(bucket=MODELS_BUCKET, replicas=replicas)
    try:
        return await js.create_object_store(MODELS_BUCKET, config=config)
    except BadRequestError:
        return await js.object_store(MODELS_BUCKET)  # as in `_key_value`


async def code_store(js: JetStreamContext, *, replicas: int = 1) -> ObjectStore:
    config = ObjectStoreConfig(bucket=CODE_BUCKET, replicas=replicas)
    try:
        return await js.create_object_store(CODE_BUCKET, config=config)
    except BadRequestError:
        return await js.object_store(CODE_BUCKET)  # as in `_key_value`


async def ensure_async_consumer(
    js: JetStreamContext, *, ack_wait_s: float, max_ack_pending: int
) -> None:
    """The ingress replicas' shared durable consumer of async invocations.

    Delivery attempts are not capped here: ingress counts them and sends what cannot
    succeed to the dead-letter stream itself, with the reason (a capped consumer would
    drop it silently). A long run keeps its message with in-progress acks well
    inside `ack_wait_s`, so only a crashed ingress's messages are redelivered."""
    config = ConsumerConfig(
        durable_name=ASYNC_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=subjects.INVOKE_ASYNC_ALL,
    )
    # Creating a durable that exists with other settings updates it.
    await js.add_consumer(INVOCATIONS_STREAM, config)


async def ensure_dead_letter_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    config = StreamConfig(
        name=DEAD_LETTER_STREAM,
        subjects=[subjects.DEAD_ALL],
        storage=StorageType.FILE,
        max_age=DEAD_LETTER_AGE_S,
        num_replicas=replicas,
    )
    await _stream(js, config)


async def ensure_logs_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """The last failed invocations (FailureRecords), for `gfaas logs`: at most
    LOGS_MAX_MSGS of them, none older than LOGS_AGE_S; the oldest go first."""
    config = StreamConfig(
        name=LOGS_STREAM,
        subjects=[subjects.LOGS_ALL],
        storage=StorageType.FILE,
        max_msgs=LOGS_MAX_MSGS,
        max_age=LOGS_AGE_S,
        num_replicas=replicas,
    )
    await _stream(js, config)


async def leader_kv(js: JetStreamContext, *, ttl_s: float, replicas: int = 1) -> KeyValue:
    return await _key_value(
        js, KeyValueConfig(bucket=LEADER_BUCKET, history=1, ttl=ttl_s, replicas=replicas)
    )
