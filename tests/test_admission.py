"""Ingress admission and the baseline placement policies, as pure functions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.ingress.admission import admit, input_node
from shared.errors import GfaasError
from shared.scheduling import RequestView, WorkerView, make_policy
from shared.schema import (
    DType,
    ErrorCode,
    FunctionKind,
    FunctionSpec,
    Handle,
    Tensor,
    TensorSpec,
    encode,
)
from shared.schema import InvokeRequest as Req
from shared.tensors import from_value

pytestmark = pytest.mark.unit

SPEC = FunctionSpec(
    name="f",
    handler="m:f",
    timeout_ms=1000,
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])],
)


def body(x: np.ndarray[Any, Any]) -> bytes:
    return encode(Req(inputs=[from_value("x", x)]))


def lookup(name: str) -> FunctionSpec | None:
    return SPEC if name == "f" else None


def refused(
    data: bytes,
    code: ErrorCode,
    *,
    function: str = "f",
    headers: dict[str, str] | None = None,
    max_payload: int = 10_000,
) -> str:
    with pytest.raises(GfaasError) as info:
        admit(function, data, headers, lookup, max_payload=max_payload, now_ms=0)
    assert info.value.code is code
    return info.value.reason


def test_admission_stamps_id_tenant_and_deadline() -> None:
    meta, request, spec = admit(
        "f",
        body(np.ones((2, 3), np.float32)),
        {"Gfaas-Tenant": "acme"},
        lambda n: SPEC,
        max_payload=10_000,
        now_ms=5_000,
    )
    assert len(meta.invocation_id) == 32
    assert (meta.tenant, meta.deadline_ms, spec.name) == ("acme", 6_000, "f")
    assert request.inputs[0].shape == [2, 3]


def test_admission_refuses_each_kind_of_bad_input() -> None:
    good = body(np.ones((1, 3), np.float32))
    assert "not deployed" in refused(good, ErrorCode.UNKNOWN_FUNCTION, function="g")
    assert "float64" in refused(body(np.ones((1, 3))), ErrorCode.INVALID_INPUT)
    assert "[-1, 3]" in refused(body(np.ones((1, 4), np.float32)), ErrorCode.INVALID_INPUT)
    assert "malformed" in refused(b"\xc1", ErrorCode.BAD_REQUEST)
    assert "limit" in refused(good, ErrorCode.PAYLOAD_TOO_LARGE, max_payload=10)
    bad_id = {"Gfaas-Invocation-Id": "a.b"}
    assert "invocation id" in refused(good, ErrorCode.BAD_REQUEST, headers=bad_id)
    assert "tenant" in refused(good, ErrorCode.BAD_REQUEST, headers={"Gfaas-Tenant": "a b"})


def workers(*loads: int, device: str = "cpu") -> list[WorkerView]:
    return [
        WorkerView(worker_id=f"w{i}", device=device, capacity=4, outstanding=n)
        for i, n in enumerate(loads)
    ]


def test_least_loaded_picks_the_idlest_worker_and_waits_when_all_are_full() -> None:
    policy = make_policy("least_loaded")
    req = RequestView(invocation_id="i", function="f")
    assert policy.choose(req, workers(3, 1, 2), 0.0) == "w1"
    assert policy.choose(req, workers(4, 4), 0.0) is None


def test_round_robin_cycles_over_workers_with_room() -> None:
    policy = make_policy("round_robin")
    req = RequestView(invocation_id="i", function="f")
    picks = [policy.choose(req, workers(0, 0, 4), 0.0) for _ in range(4)]
    assert picks == ["w0", "w1", "w0", "w1"]


def test_gpu_functions_prefer_gpu_workers_and_fall_back_to_cpu_without_any() -> None:
    policy = make_policy("least_loaded")
    gpu_req = RequestView(invocation_id="i", function="f", kind=FunctionKind.GPU)
    mixed = [
        WorkerView(worker_id="c", device="cpu", capacity=4),
        WorkerView(worker_id="g", device="cuda:0", capacity=4, outstanding=2),
    ]
    assert policy.choose(gpu_req, mixed, 0.0) == "g"
    assert policy.choose(gpu_req, workers(1, 0), 0.0) == "w1"


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("magic")


def pooled(name: str, node: str, nbytes: int) -> Tensor:
    handle = Handle(
        backend="shm",
        pool=node,
        segment="seg",
        device="cpu",
        offset=0,
        nbytes=nbytes,
        lease_id="l1",
        generation=1,
    )
    return Tensor(name=name, dtype=DType.FLOAT32, shape=[nbytes // 12, 3], handle=handle)


def test_admission_names_the_node_that_holds_the_inputs() -> None:
    meta, _, _ = admit(
        "f", encode(Req(inputs=[pooled("x", "n2", 24)])), {}, lookup, max_payload=10_000, now_ms=0
    )
    assert meta.node == "n2"
    assert meta.to_headers()["Gfaas-Input-Node"] == "n2"
    by_value, _, _ = admit(
        "f", body(np.ones((2, 3), np.float32)), {}, lookup, max_payload=10_000, now_ms=0
    )
    assert by_value.node == ""
    assert "Gfaas-Input-Node" not in by_value.to_headers()
    # Spread over pools: the one holding the most bytes (ties: the first name).
    by_value_x = from_value("x", np.ones(3, np.float32))
    assert input_node([pooled("a", "n1", 24), pooled("b", "n2", 48), by_value_x]) == "n2"
    assert input_node([pooled("a", "n3", 24), pooled("b", "n1", 24)]) == "n1"


def test_a_caller_set_deadline_is_capped() -> None:
    good = body(np.ones((1, 3), np.float32))
    day_ms = 86_400_000

    def deadline(headers: dict[str, str] | None = None, data: bytes = good, **kw: Any) -> int:
        meta, _, _ = admit("f", data, headers, lookup, max_payload=10_000, now_ms=5_000, **kw)
        return meta.deadline_ms

    far = encode(Req(inputs=[from_value("x", np.ones((1, 3), np.float32))], timeout_ms=day_ms))
    # A day asked for, in the request or as the header's absolute time: the cap's worth.
    assert deadline(data=far, max_timeout_ms=60_000) == 65_000
    assert deadline({"Gfaas-Deadline-Ms": str(10 * day_ms)}, max_timeout_ms=60_000) == 65_000
    assert deadline({"Gfaas-Deadline-Ms": str(2**70)}) == 5_000 + 900_000  # the default
    # Under the cap, as asked; a function's own longer timeout is still its own.
    assert deadline({"Gfaas-Deadline-Ms": "30000"}, max_timeout_ms=60_000) == 30_000
    assert deadline(max_timeout_ms=10) == 6_000
    assert deadline(data=far, max_timeout_ms=10) == 6_000
    assert deadline(data=far, max_timeout_ms=float("inf")) == 5_000 + day_ms


def test_a_negative_deadline_or_timeout_is_refused() -> None:
    good = body(np.ones((1, 3), np.float32))
    back = encode(Req(inputs=[from_value("x", np.ones((1, 3), np.float32))], timeout_ms=-5))
    assert "timeout_ms" in refused(back, ErrorCode.BAD_REQUEST)
    headers = {"Gfaas-Deadline-Ms": "-1"}
    assert "Gfaas-Deadline-Ms" in refused(good, ErrorCode.BAD_REQUEST, headers=headers)
    for word in ("inf", "nan", "1e9", "soon"):
        headers = {"Gfaas-Deadline-Ms": word}
        assert "integer" in refused(good, ErrorCode.BAD_REQUEST, headers=headers)
