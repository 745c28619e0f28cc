"""JetStream resources gfaas keeps: names and idempotent creation.

- stream GFAAS_INVOCATIONS: async invocations (work queue, deduplicated by Nats-Msg-Id)
- KV gfaas_functions: the function registry
- KV gfaas_workflows: the workflow registry
- KV gfaas_results: async results, kept for RESULT_TTL_S
- object store gfaas_models: model weights
"""

from __future__ import annotations

from typing import Final

from nats.js.api import (
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
MODELS_BUCKET: Final = "gfaas_models"
DEDUP_WINDOW_S: Final = 120.0
RESULT_TTL_S: Final = 3600.0


async def ensure_invocations_stream(js: JetStreamContext) -> None:
    config = StreamConfig(
        name=INVOCATIONS_STREAM,
        subjects=[subjects.INVOKE_ASYNC_ALL],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DEDUP_WINDOW_S,
        max_age=24 * 3600.0,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another config (an older deployment): bring it to ours.
        await js.update_stream(config)


async def functions_kv(js: JetStreamContext) -> KeyValue:
    return await js.create_key_value(KeyValueConfig(bucket=FUNCTIONS_BUCKET, history=1))


async def workflows_kv(js: JetStreamContext) -> KeyValue:
    return await js.create_key_value(KeyValueConfig(bucket=WORKFLOWS_BUCKET, history=1))


async def results_kv(js: JetStreamContext) -> KeyValue:
    return await js.create_key_value(
        KeyValueConfig(bucket=RESULTS_BUCKET, history=1, ttl=RESULT_TTL_S)
    )


async def models_store(js: JetStreamContext) -> ObjectStore:
    return await js.create_object_store(
        MODELS_BUCKET, config=ObjectStoreConfig(bucket=MODELS_BUCKET)
    )
