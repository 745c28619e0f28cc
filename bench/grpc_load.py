"""A gRPC load generator for the Open Inference Protocol, run as its own process.

    python -m bench.grpc_load HOST:PORT MODEL --concurrency 1 --seconds 10

Sends `ModelInfer` requests (one FP32 input `x` of shape [1], raw contents) from
`concurrency` asyncio tasks for `seconds`, after a short warm-up, and prints one JSON
line: the count, requests/s and latency percentiles in ms. Uses tritonclient's
generated stubs over grpc.aio, as a Triton user's client would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

# Calls made before measuring: the connection, the server's caches.
WARMUP = 50


def request(model: str) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = "x", "FP32"
    tensor.shape.append(1)
    req.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    return req


async def run(target: str, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = request(model)
        for _ in range(WARMUP):
            await stub.ModelInfer(req)
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def loop() -> None:
            while time.perf_counter() < end:
                started = time.perf_counter()
                await stub.ModelInfer(req)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000.0
    return {
        "requests": float(len(lat)),
        "warmup_calls": float(WARMUP),
        "rps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("model")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.target, args.model, args.concurrency, args.seconds))))


if __name__ == "__main__":
    main()
