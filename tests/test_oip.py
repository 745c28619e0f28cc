"""The Open Inference Protocol front: KServe v2 / Triton HTTP against an in-memory backend."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from starlette.types import Message

from services.ingress import oip, oip_response
from services.ingress.http import create_app
from services.ingress.oip import InferRequest
from services.ingress.shm_regions import ShmRegions
from services.ingress.statuses import STATUSES
from shared.errors import GfaasError
from shared.schema import (
    DType,
    ErrorCode,
    ErrorInfo,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
    Tensor,
    TensorSpec,
)

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

MAX_PAYLOAD = 64 * 1024
HEADER = "Inference-Header-Content-Length"

DOUBLE = FunctionSpec(
    name="double",
    handler="tests.funcs:double",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])],
    outputs=[
        TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 3]),
        TensorSpec(name="count", dtype=DType.INT64, shape=[1]),
    ],
)
FAILING = FunctionSpec(name="failing", handler="tests.funcs:boom")

Handler = Callable[[InvokeRequest], InvokeReply]


def array_of(t: Tensor) -> np.ndarray[Any, Any]:
    return np.frombuffer(t.data, dtype=np.dtype(t.dtype.value).newbyteorder("<")).reshape(t.shape)


def tensor_of(name: str, a: np.ndarray[Any, Any]) -> Tensor:
    dtype = DType(a.dtype.name)
    return Tensor(name=name, dtype=dtype, shape=list(a.shape), data=a.astype(a.dtype).tobytes())


def double(request: InvokeRequest) -> InvokeReply:
    (x,) = request.inputs
    y = array_of(x) * 2
    count = np.array([y.size], dtype=np.int64)
    return InvokeReply(
        invocation_id="inv-1", outputs=[tensor_of("y", y), tensor_of("count", count)]
    )


class FakeBackend:
    """The InferenceBackend ingress implements, in memory."""

    def __init__(self) -> None:
        self.serving = True
        self.functions: dict[str, tuple[FunctionSpec, Handler]] = {"double": (DOUBLE, double)}
        self.calls: list[tuple[str, InvokeRequest, dict[str, str]]] = []
        self.failure: ErrorInfo | None = None
        self.raises: Exception | None = None
        self.regions = ShmRegions()

    def ready(self) -> bool:
        return self.serving

    def specs(self) -> Sequence[FunctionSpec]:
        return [spec for spec, _ in self.functions.values()]

    def spec(self, name: str) -> FunctionSpec | None:
        entry = self.functions.get(name)
        return entry[0] if entry else None

    def not_ready(self, name: str) -> str | None:
        return None if self.serving else "ingress is not serving"

    def output_names(self, name: str) -> Collection[str] | None:
        spec = self.spec(name)
        return [o.name for o in spec.outputs] if spec is not None and spec.outputs else None

    async def infer(
        self, name: str, request: InvokeRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        self.calls.append((name, request, dict(headers)))
        if self.raises is not None:
            raise self.raises
        if self.failure is not None:
            return InvokeReply(invocation_id="inv-1", error=self.failure)
        return self.functions[name][1](request)

    async def infer_shm(
        self, name: str, parsed: InferRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        # By value in memory: the live ingress moves region bytes through the pool.
        inputs = [
            msgspec.structs.replace(t, data=self._read(ref))
            if (ref := parsed.shm_inputs.get(t.name)) is not None
            else t
            for t in parsed.invoke.inputs
        ]
        reply = await self.infer(
            name, msgspec.structs.replace(parsed.invoke, inputs=inputs), headers
        )
        for wanted in parsed.outputs or ():
            out = next(t for t in reply.outputs if t.name == wanted.name)
            if wanted.shm is not None:
                self.regions.write_from(wanted.shm, memoryview(out.data))
        return reply

    def _read(self, ref: oip.ShmRef) -> bytes:
        data = bytearray(ref.byte_size)
        self.regions.read_into(ref, memoryview(data))
        return bytes(data)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(backend, max_payload=MAX_PAYLOAD))
    async with httpx.AsyncClient(transport=transport, base_url="http://gfaas") as c:
        yield c


X = np.arange(6, dtype=np.float32).reshape(2, 3) / 4


def json_input(data: Any, shape: Sequence[int] = (2, 3), datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "x", "shape": list(shape), "datatype": datatype, "data": data}


def binary_request(
    inputs: Sequence[tuple[str, np.ndarray[Any, Any], str]],
    outputs: Sequence[dict[str, Any]] | None = None,
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A body the way tritonclient.http builds one (see _get_inference_request)."""
    request: dict[str, Any] = dict(fields)
    request["inputs"] = [
        {
            "name": name,
            "shape": list(a.shape),
            "datatype": datatype,
            "parameters": {"binary_data_size": a.nbytes},
        }
        for name, a, datatype in inputs
    ]
    if outputs:
        request["outputs"] = list(outputs)
    else:
        request.setdefault("parameters", {})["binary_data_output"] = True
    header = json.dumps(request).encode()
    body = header + b"".join(a.tobytes() for _, a, _ in inputs)
    return body, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def parse_like_tritonclient(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """Decode a response the way tritonclient.http's InferResult does."""
    dtypes = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_, "FP16": np.float16}
    if header_length is None:
        result = json.loads(body)
        buffer = b""
    else:
        result = json.loads(body[: int(header_length)])
        buffer = body[int(header_length) :]
    arrays = {}
    index = 0
    for out in result["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw: np.ndarray[Any, Any] = np.frombuffer(
                buffer[index : index + size], dtype=dtypes[out["datatype"]]
            )
            index += size
        else:
            raw = np.array(out["data"], dtype=dtypes[out["datatype"]])
        arrays[out["name"]] = raw.reshape(out["shape"])
    return result, arrays


# -- server and model metadata, health --------------------------------------------------


async def test_server_metadata_names_gfaas_and_its_extensions(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2")
    assert r.status_code == 200
    meta = r.json()
    assert meta["name"] == "gfaas"
    assert meta["version"]
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


async def test_live_is_200_even_when_not_ready(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.serving = False
    r = await client.get("/v2/health/live")
    assert (r.status_code, r.json()) == (200, {"live": True})


async def test_ready_follows_the_backend_with_a_4xx_for_false(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    r = await client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True})
    backend.serving = False
    r = await client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (400, {"ready": False})


@pytest.mark.parametrize("path", ["/v2/models/double", "/v2/models/double/versions/1"])
async def test_model_metadata_lists_tensors_with_oip_datatypes(
    client: httpx.AsyncClient, path: str
) -> None:
    r = await client.get(path)
    assert r.status_code == 200
    assert r.json() == {
        "name": "double",
        "versions": ["1"],
        "platform": "gfaas",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "count", "datatype": "INT64", "shape": [1]},
        ],
    }


@pytest.mark.parametrize(
    "path", ["/v2/models/nope", "/v2/models/double/versions/2", "/v2/models/nope/ready"]
)
async def test_unknown_models_and_versions_get_404_with_an_error(
    client: httpx.AsyncClient, path: str
) -> None:
    r = await client.get(path)
    assert r.status_code == 404
    assert r.json()["error"].startswith("unknown_function: ")


async def test_model_ready_is_200_for_a_deployed_model(client: httpx.AsyncClient) -> None:
    for path in ("/v2/models/double/ready", "/v2/models/double/versions/1/ready"):
        r = await client.get(path)
        assert (r.status_code, r.json()) == (200, {"name": "double", "ready": True})


async def test_model_ready_is_400_while_ingress_is_not_serving(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.serving = False
    r = await client.get("/v2/models/double/ready")
    assert r.status_code == 400
    assert r.json()["ready"] is False
    assert "not ready" in r.json()["error"]


async def test_unknown_paths_answer_in_the_error_shape(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/nothing/here")
    assert r.status_code == 404
    assert "error" in r.json()
    assert (await client.get("/v2/models/double/infer")).status_code == 405


# -- repository --------------------------------------------------------------------------


async def test_repository_index_lists_every_deployed_model(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/repository/index")
    assert r.status_code == 200
    assert r.json() == [{"name": "double", "version": "1", "state": "READY"}]


async def test_repository_index_with_ready_filters_out_unavailable_models(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.serving = False
    assert (await client.post("/v2/repository/index", json={"ready": True})).json() == []
    (entry,) = (await client.post("/v2/repository/index", json={"ready": False})).json()
    assert entry["state"] == "UNAVAILABLE"
    assert entry["reason"]


async def test_repository_index_rejects_a_malformed_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/repository/index", content=b'{"ready": "yes"}')
    assert r.status_code == 400


async def test_repository_load_is_refused_with_a_reason(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/repository/models/double/load")
    assert r.status_code == 400
    assert "gfaas deploy" in r.json()["error"]


# -- inference, JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("data", [X.tolist(), X.reshape(-1).tolist()], ids=["nested", "flat"])
async def test_json_inference_takes_nested_or_flat_data(
    client: httpx.AsyncClient, backend: FakeBackend, data: Any
) -> None:
    r = await client.post(
        "/v2/models/double/infer", json={"id": "42", "inputs": [json_input(data)]}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert HEADER not in r.headers
    result = r.json()
    assert result["model_name"] == "double"
    assert result["model_version"] == "1"
    assert result["id"] == "42"
    y, count = result["outputs"]
    assert y == {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": (X * 2).ravel().tolist()}
    assert count["data"] == [6]
    (_, sent, _) = backend.calls[0]
    assert array_of(sent.inputs[0]).tolist() == X.tolist()


async def test_the_response_id_is_the_invocation_id_when_the_request_has_none(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v2/models/double/infer", json={"inputs": [json_input(X.tolist())]})
    assert r.json()["id"] == "inv-1"


async def test_listed_outputs_are_the_only_ones_returned(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v2/models/double/infer",
        json={"inputs": [json_input(X.tolist())], "outputs": [{"name": "count"}]},
    )
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["count"]


async def test_an_empty_list_of_outputs_returns_every_output(client: httpx.AsyncClient) -> None:
    """As an absent list, and as the gRPC front and Triton do."""
    every = await client.post("/v2/models/double/infer", json={"inputs": [json_input(X.tolist())]})
    r = await client.post(
        "/v2/models/double/infer", json={"inputs": [json_input(X.tolist())], "outputs": []}
    )
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == [o["name"] for o in every.json()["outputs"]]
    assert len(r.json()["outputs"]) == 2


async def test_an_output_the_model_does_not_declare_is_refused_before_running(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    r = await client.post(
        "/v2/models/double/infer",
        json={"inputs": [json_input(X.tolist())], "outputs": [{"name": "z"}]},
    )
    assert r.status_code == 400
    assert "no output 'z'" in r.json()["error"]
    assert backend.calls == []


async def test_request_timeout_parameter_becomes_the_invocation_timeout(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    await client.post(
        "/v2/models/double/infer",
        json={"inputs": [json_input(X.tolist())], "parameters": {"timeout": 2_500_000}},
    )
    assert backend.calls[0][1].timeout_ms == 2500


async def test_trace_context_and_tenant_headers_reach_the_backend(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.post(
        "/v2/models/double/infer",
        json={"inputs": [json_input(X.tolist())]},
        headers={"traceparent": traceparent, "Gfaas-Tenant": "acme", "X-Other": "no"},
    )
    passed = backend.calls[0][2]
    assert set(passed) == {"traceparent", "Gfaas-Tenant"}
    assert passed["Gfaas-Tenant"] == "acme"
    # The caller's trace goes on; its parent span is the front's own where a tracer
    # provider is set (another test in the session may have set one), else the caller's.
    version, trace_id, _, flags = passed["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")


async def test_a_gzip_compressed_request_is_accepted(client: httpx.AsyncClient) -> None:
    body = gzip.compress(json.dumps({"inputs": [json_input(X.tolist())]}).encode())
    r = await client.post(
        "/v2/models/double/infer", content=body, headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 200, r.text


# -- inference, binary tensor data extension ---------------------------------------------


async def test_float32_round_trips_as_binary_both_ways(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    body, headers = binary_request([("x", X, "FP32")])
    r = await client.post("/v2/models/double/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    result, arrays = parse_like_tritonclient(r.content, r.headers[HEADER])
    assert [o["parameters"] for o in result["outputs"]] == [
        {"binary_data_size": 24},
        {"binary_data_size": 8},
    ]
    assert all("data" not in o for o in result["outputs"])
    np.testing.assert_array_equal(arrays["y"], X * 2)
    assert arrays["count"].tolist() == [6]
    sent = backend.calls[0][1].inputs[0]
    assert (sent.dtype, sent.shape) == (DType.FLOAT32, [2, 3])
    np.testing.assert_array_equal(array_of(sent), X)


async def test_binary_input_with_json_output_by_default(client: httpx.AsyncClient) -> None:
    body, headers = binary_request([("x", X, "FP32")], outputs=[{"name": "y"}])
    r = await client.post("/v2/models/double/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert HEADER not in r.headers
    result, arrays = parse_like_tritonclient(r.content, None)
    assert [o["name"] for o in result["outputs"]] == ["y"]
    np.testing.assert_array_equal(arrays["y"], X * 2)


async def test_per_output_binary_data_overrides_the_request_default(
    client: httpx.AsyncClient,
) -> None:
    outputs = [
        {"name": "count", "parameters": {"binary_data": False}},
        {"name": "y", "parameters": {"binary_data": True}},
    ]
    body, headers = binary_request([("x", X, "FP32")], outputs=outputs)
    r = await client.post("/v2/models/double/infer", content=body, headers=headers)
    result, arrays = parse_like_tritonclient(r.content, r.headers[HEADER])
    count, y = result["outputs"]
    assert count["data"] == [6]
    assert "parameters" not in count
    assert y["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(arrays["y"], X * 2)


def test_json_and_binary_inputs_mix_in_one_request() -> None:
    flags = np.array([True, False, True])
    body, headers = binary_request([("b", flags, "BOOL")])
    request = json.loads(body[: int(headers[HEADER])])
    request["inputs"].insert(0, json_input([1, 2], shape=[2], datatype="UINT16"))
    header = json.dumps(request).encode()
    parsed = oip.parse_infer_request(header + flags.tobytes(), len(header))
    u16, b = parsed.invoke.inputs
    assert array_of(u16).tolist() == [1, 2]
    assert u16.dtype == DType.UINT16
    assert array_of(b).tolist() == [True, False, True]
    assert parsed.binary_outputs


def test_fp16_outputs_encode_as_json_numbers_and_as_binary() -> None:
    half = np.array([0.5, -2.0], dtype=np.float16)
    outputs = [tensor_of("h", half)]
    for binary in (False, True):
        request = oip.InferRequest(
            id="", invoke=InvokeRequest(), outputs=None, binary_outputs=binary
        )
        encoded = oip_response.encode_infer_response("m", request, outputs, response_id="r")
        length = None if encoded.header_length is None else str(encoded.header_length)
        _, arrays = parse_like_tritonclient(encoded.body, length)
        np.testing.assert_array_equal(arrays["h"], half)


# -- request validation ------------------------------------------------------------------


async def post_json(client: httpx.AsyncClient, request: Any) -> tuple[int, str]:
    r = await client.post("/v2/models/double/infer", content=json.dumps(request).encode())
    return r.status_code, r.json()["error"]


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ([json_input([1.0, 2.0])], "2 elements for shape [2, 3] (6 expected)"),
        ([json_input([[1.0, 2.0], [3.0]])], "ragged"),
        ([json_input([1, 2, 3], shape=[3], datatype="FP99")], "unknown datatype 'FP99'"),
        ([json_input(["a"], shape=[1], datatype="BYTES")], "BYTES (string) tensors"),
        ([json_input([1.5], shape=[1], datatype="INT32")], "INT32 data must be integers"),
        ([json_input([300], shape=[1], datatype="UINT8")], "outside the UINT8 range"),
        ([json_input([7e4], shape=[1], datatype="FP16")], "outside the FP16 range (|x| <= 65504)"),
        ([json_input([-1e39], shape=[1])], "outside the FP32 range"),
        ([json_input([1], shape=[1], datatype="BOOL")], "BOOL data must be booleans"),
        # A boolean among numbers was read as 1 or 0 (Python's bool is an int).
        ([json_input([[1.0, True, 3.0], [4.0, 5.0, 6.0]])], "FP32 data must be numbers, not b"),
        ([json_input([True, 2], shape=[2], datatype="INT64")], "INT64 data must be integers, not"),
        ([json_input([[0], [False]], shape=[2, 1], datatype="UINT8")], "UINT8 data must be int"),
        ([json_input([1.5, False], shape=[2], datatype="FP64")], "FP64 data must be numbers, not"),
        ([json_input([True, False], shape=[2])], "FP32 data must be numbers"),
        ([json_input("1,2", shape=[1])], "data must be a JSON array"),
        ([{"name": "x", "shape": [1], "datatype": "FP32"}], "no data"),
        ([json_input([1.0], shape=[-1])], "invalid inference request"),
        ([json_input([1.0], shape=[1]), json_input([1.0], shape=[1])], "more than once"),
    ],
)
async def test_invalid_json_inputs_get_400_with_the_reason(
    client: httpx.AsyncClient, backend: FakeBackend, inputs: list[dict[str, Any]], fragment: str
) -> None:
    status, error = await post_json(client, {"inputs": inputs})
    assert status == 400
    assert error.startswith("bad_request: ")
    assert fragment in error
    assert backend.calls == []


async def test_malformed_json_gets_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/models/double/infer", content=b'{"inputs": [')
    assert r.status_code == 400
    assert "malformed inference request JSON" in r.json()["error"]


DEEP = "[" * 10_000 + "1" + "]" * 10_000  # past msgspec's recursion depth, 20 kB
_INPUT = '{"name": "x", "shape": [2, 3], "datatype": "FP32"'


@pytest.mark.parametrize(
    ("path", "body", "what"),
    [
        ("/v2/models/double/infer", f'{{"inputs": [{_INPUT}, "data": {DEEP}}}]}}', "inference"),
        (
            "/v2/models/double/infer",
            f'{{"inputs": [], "parameters": {{"p": {DEEP}}}}}',
            "inference",
        ),
        ("/v2/models/double/infer", f'{{"inputs": [], "extra": {DEEP}}}', "inference"),
        (
            "/v2/systemsharedmemory/region/r/register",
            f'{{"key": "k", "byte_size": 4, "x": {DEEP}}}',
            "shared-memory register",
        ),
        (
            "/v2/cudasharedmemory/region/r/register",
            f'{{"device_id": 0, "byte_size": 4, "x": {DEEP}}}',
            "CUDA shared-memory register",
        ),
        ("/v2/repository/index", f'{{"x": {DEEP}}}', "repository index"),
    ],
)
async def test_too_deeply_nested_json_gets_400(
    client: httpx.AsyncClient, backend: FakeBackend, path: str, body: str, what: str
) -> None:
    r = await client.post(path, content=body.encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"bad_request: malformed {what} request JSON: too deeply nested"
    assert backend.calls == []


@pytest.mark.parametrize(
    ("size", "extra", "header_delta", "fragment"),
    [
        (20, b"", 0, "binary_data_size 20 does not match FP32[2, 3] (24 bytes)"),
        (24, b"\0" * 4, 0, "4 bytes of binary data after the last binary input"),
        (24, b"", 10_000, "outside the"),
    ],
)
async def test_inconsistent_binary_requests_get_400(
    client: httpx.AsyncClient, size: int, extra: bytes, header_delta: int, fragment: str
) -> None:
    body, headers = binary_request([("x", X, "FP32")])
    header_length = int(headers[HEADER])
    request = json.loads(body[:header_length])
    request["inputs"][0]["parameters"]["binary_data_size"] = size
    header = json.dumps(request).encode()
    headers[HEADER] = str(len(header) + header_delta)
    r = await client.post(
        "/v2/models/double/infer", content=header + X.tobytes()[:size] + extra, headers=headers
    )
    assert r.status_code == 400
    assert fragment in r.json()["error"]


def test_truncated_binary_data_gets_400() -> None:
    body, headers = binary_request([("x", X, "FP32")])
    with pytest.raises(GfaasError, match="only 20 bytes follow") as caught:
        oip.parse_infer_request(body[:-4], int(headers[HEADER]))
    assert caught.value.code == ErrorCode.BAD_REQUEST


async def test_binary_data_size_without_the_header_length_gets_400(
    client: httpx.AsyncClient,
) -> None:
    body, headers = binary_request([("x", X, "FP32")])
    del headers[HEADER]
    r = await client.post("/v2/models/double/infer", content=body, headers=headers)
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"sequence_id": 7}, "sequence batching"),
        ({"binary_data_output": "yes"}, "must be a boolean"),
        ({"timeout": -1}, "parameters.timeout"),
        # Past int64: they would overflow the invocation's msgpack, or float division.
        ({"timeout": 10**25}, "parameters.timeout must be an integer in [0, 2**63-1]"),
        ({"timeout": 10**400}, "parameters.timeout must be an integer in [0, 2**63-1]"),
    ],
)
async def test_unsupported_or_malformed_request_parameters_get_400(
    client: httpx.AsyncClient, backend: FakeBackend, parameters: dict[str, Any], fragment: str
) -> None:
    status, error = await post_json(
        client, {"inputs": [json_input(X.tolist())], "parameters": parameters}
    )
    assert status == 400
    assert fragment in error
    assert backend.calls == []


async def test_the_largest_timeout_is_taken_and_rounded_up_to_whole_ms(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    body = {"inputs": [json_input(X.tolist())], "parameters": {"timeout": 2**63 - 1}}
    r = await client.post("/v2/models/double/infer", json=body)
    assert r.status_code == 200, r.text
    assert backend.calls[0][1].timeout_ms == 9_223_372_036_854_776  # ceil(µs / 1000)


@pytest.mark.parametrize(
    ("shape", "parameters"),
    [
        ([0, 2**64], {}),
        ([0, 2**63], {}),
        ([2, 3], {"shared_memory_region": "r", "shared_memory_byte_size": 2**64}),
        (
            [2, 3],
            {
                "shared_memory_region": "r",
                "shared_memory_byte_size": 24,
                "shared_memory_offset": 2**63,
            },
        ),
    ],
)
async def test_dimensions_and_sizes_past_int64_get_400(
    client: httpx.AsyncClient, backend: FakeBackend, shape: list[int], parameters: dict[str, Any]
) -> None:
    item: dict[str, Any] = {
        "name": "x",
        "shape": shape,
        "datatype": "FP32",
        "parameters": parameters,
    }
    if not parameters:
        item["data"] = []
    status, error = await post_json(client, {"inputs": [item]})
    assert status == 400, error
    assert "9223372036854775807" in error or "2**63-1" in error, error
    assert backend.calls == []


async def test_a_body_over_max_payload_gets_413(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    r = await client.post("/v2/models/double/infer", content=b" " * (MAX_PAYLOAD + 1))
    assert r.status_code == 413
    assert r.json()["error"].startswith("payload_too_large: ")
    assert backend.calls == []


async def test_a_streamed_body_over_max_payload_gets_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * (MAX_PAYLOAD // 2)

    r = await client.post("/v2/models/double/infer", content=chunks())
    assert r.status_code == 413


async def test_a_compressed_body_that_inflates_past_max_payload_gets_413(
    client: httpx.AsyncClient,
) -> None:
    bomb = gzip.compress(b" " * (MAX_PAYLOAD * 4))
    r = await client.post(
        "/v2/models/double/infer", content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 413


async def test_inference_on_an_unknown_model_gets_404(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_function: model 'nope' is not deployed"


# -- error mapping -----------------------------------------------------------------------

EXPECTED_STATUS = {
    ErrorCode.UNKNOWN_FUNCTION: 404,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.WORKER_LOST: 503,
    ErrorCode.HANDLER_ERROR: 500,
    ErrorCode.MODEL_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.NO_POOL: 400,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.SLO_UNMEETABLE: 503,
    ErrorCode.SUPERSEDED: 409,
    ErrorCode.NOT_FOUND: 404,
}


@pytest.mark.parametrize(("code", "status"), EXPECTED_STATUS.items())
async def test_error_replies_map_to_http_statuses(
    client: httpx.AsyncClient, backend: FakeBackend, code: ErrorCode, status: int
) -> None:
    backend.failure = ErrorInfo(code=code, reason="it went wrong")
    status_got, error = await post_json(client, {"inputs": [json_input(X.tolist())]})
    assert (status_got, error) == (status, f"{code}: it went wrong")


@pytest.mark.parametrize(("code", "status"), EXPECTED_STATUS.items())
async def test_raised_gfaas_errors_map_like_error_replies(
    client: httpx.AsyncClient, backend: FakeBackend, code: ErrorCode, status: int
) -> None:
    backend.raises = GfaasError(code, "raised")
    assert await post_json(client, {"inputs": [json_input(X.tolist())]}) == (
        status,
        f"{code}: raised",
    )


def test_every_error_code_has_a_status() -> None:
    # `pending` is a result lookup's answer, never an inference's.
    assert set(ErrorCode) - {ErrorCode.PENDING} == set(STATUSES) == set(EXPECTED_STATUS)


async def test_an_unexpected_backend_exception_is_a_500_in_the_error_shape(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    backend.raises = RuntimeError("nats went away")
    status, error = await post_json(client, {"inputs": [json_input(X.tolist())]})
    assert status == 500
    assert error.startswith("internal: ")


async def test_an_output_whose_bytes_do_not_match_its_shape_is_an_internal_error(
    client: httpx.AsyncClient, backend: FakeBackend
) -> None:
    def broken(request: InvokeRequest) -> InvokeReply:
        bad = Tensor(name="y", dtype=DType.FLOAT32, shape=[2], data=b"\0" * 4)
        return InvokeReply(invocation_id="inv-1", outputs=[bad])

    backend.functions["double"] = (DOUBLE, broken)
    status, error = await post_json(client, {"inputs": [json_input(X.tolist())]})
    assert status == 500
    assert "4 bytes for float32[2]" in error


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"shared_memory_region": "r"}, "shared_memory_byte_size must be"),
        ({"shared_memory_region": "", "shared_memory_byte_size": 24}, "region name"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 20}, "does not match"),
        (
            {
                "shared_memory_region": "r",
                "shared_memory_byte_size": 24,
                "shared_memory_offset": -1,
            },
            "shared_memory_offset must be",
        ),
    ],
)
def test_bad_shared_memory_parameters_are_refused(parameters: dict[str, Any], match: str) -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": parameters}]}
    ).encode()
    with pytest.raises(GfaasError, match=match):
        oip.parse_infer_request(body, None)


def test_shared_memory_inputs_and_outputs_are_parsed() -> None:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {
                        "shared_memory_region": "in",
                        "shared_memory_byte_size": 24,
                        "shared_memory_offset": 8,
                    },
                }
            ],
            "outputs": [
                {
                    "name": "y",
                    "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 24},
                }
            ],
        }
    ).encode()
    parsed = oip.parse_infer_request(body, None)
    assert parsed.shm_inputs == {"x": oip.ShmRef("in", 8, 24)}
    assert parsed.outputs is not None
    assert parsed.outputs[0].shm == oip.ShmRef("out", 0, 24)
    assert parsed.uses_shm
    assert parsed.invoke.inputs[0].data == b""


# What Starlette's router would make of each path, for the inference routes.
INFER_PATHS = [
    "/v2/models/double/infer",
    "/v2/models/double/versions/1/infer",
    "/v2/models/double/versions/2/infer",
    "/v2/models/stats/infer",
    "/v2/models/a.b-c_d/infer",
    "/v2/models//infer",
    "/v2/models/double/versions//infer",
    "/v2/models/double/infer/",
    "/v2/models/double/infers",
    "/v2/models/double",
    "/v2/models/double/ready",
    "/v2/models/double/versions/1/ready",
    "/v2/models/double/extra/infer",
    "/v1/models/double/infer",
    "/v2/modelz/double/infer",
    "/x/v2/models/double/infer",
    "/v2/models/double/versions/1/extra/infer",
    "",
    "/",
]


@pytest.mark.parametrize("path", INFER_PATHS)
def test_the_direct_infer_route_matches_what_starlettes_router_would(path: str) -> None:
    from starlette.routing import Match, Route

    from services.ingress.http import MODEL_ROUTE, VERSIONED_ROUTE, infer_path_params

    async def endpoint(request: object) -> None:
        return None

    expected = None
    for template in (f"{MODEL_ROUTE}/infer", f"{VERSIONED_ROUTE}/infer"):
        scope = {"type": "http", "path": path, "method": "POST", "root_path": ""}
        match, child = Route(template, endpoint, methods=["POST"]).matches(scope)
        if match is Match.FULL:
            expected = child["path_params"]
            break
    assert infer_path_params(path) == expected


async def test_the_direct_infer_route_answers_as_the_routed_one_did(
    client: httpx.AsyncClient,
) -> None:
    # Only POST is inference; the other methods on its path answer 405 as before.
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    ok = await client.post("/v2/models/double/versions/1/infer", json=body)
    assert ok.status_code == 200
    assert ok.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0]
    wrong = await client.get("/v2/models/double/infer")
    assert wrong.status_code == 405
    assert "error" in wrong.json()
    unknown = await client.post("/v2/models/double/versions/7/infer", json=body)
    assert unknown.status_code == 404
    assert "no version '7'" in unknown.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/index",
        "/v2/systemsharedmemory/region/r/register",
        "/v2/cudasharedmemory/region/r/register",
        "/v2/models/double/infer",
    ],
)
async def test_a_client_gone_before_its_body_came_is_no_server_error(
    backend: FakeBackend, path: str
) -> None:
    # The ASGI server says so with http.disconnect; an exception out of the app is a
    # traceback in ingress's log (uvicorn's "Exception in ASGI application").
    app = create_app(backend, max_payload=MAX_PAYLOAD)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gfaas"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert backend.calls == []
