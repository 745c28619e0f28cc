"""`gfaas demo`: deploy the examples on a running platform, invoke them, print results."""

from __future__ import annotations

import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np

from examples.specs import example_spec_paths, example_workflow_paths
from examples.text.tokenize import tokenize
from examples.weights import write_all
from gfaas.client import Client, outputs_of
from shared import auth
from shared.config import Settings
from shared.spec import load_any, load_spec


async def wait_ready(client: Client, functions: set[str], timeout: float = 90.0) -> None:
    """Until a worker has joined and ingress knows every function."""
    with anyio.fail_after(timeout):
        while True:
            try:
                scheduler = await client.status("scheduler", timeout=1)
                ingress = await client.status("ingress", timeout=1)
                known = {
                    *ingress.details.get("functions", []),
                    *ingress.details.get("workflows", []),
                }
                if scheduler.details.get("workers") and functions <= known:
                    return
            except Exception:  # services still starting: ask again
                pass
            await anyio.sleep(0.2)


async def timed(client: Client, function: str, inputs: dict[str, Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = await client.invoke(function, inputs, timeout=60)
    return out, (time.perf_counter() - started) * 1000


async def run_demo(url: str, settings: Settings) -> int:
    async with Client.connect(url, creds=auth.default_admin_creds(settings) or "") as client:
        await client.ensure_resources()
        print("1. model weights: generated (seeded) and pushed to the JetStream object store")
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in write_all(Path(tmp)).items():
                size = await client.push_model(name, path)
                print(f"   {name:14} {size / 1e6:6.1f} MB")
        specs = [load_spec(p) for p in example_spec_paths()]
        for spec in specs:
            await client.deploy(spec)
        print(f"2. deployed: {', '.join(s.name for s in specs)}")
        await wait_ready(client, {s.name for s in specs})

        print("3. image classification, step by step (preprocess -> classifier -> topk)")
        image = np.random.default_rng(7).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
        for attempt in ("cold", "warm"):
            pixels, t1 = await timed(client, "preprocess", {"image": image})
            logits, t2 = await timed(client, "classifier", {"pixels": pixels["pixels"]})
            top, t3 = await timed(client, "topk", {"logits": logits["logits"]})
            print(
                f"   {attempt}: preprocess {t1:6.1f} ms, classifier {t2:7.1f} ms, topk {t3:5.1f} ms"
            )
        for cls, p in zip(top["classes"][0], top["probs"][0], strict=True):
            print(f"   class {int(cls):4d}  p={float(p):.4f}")
        workflows = [load_any(p) for p in example_workflow_paths()]
        for workflow in workflows:
            await client.deploy(workflow)
        await wait_ready(client, {w.name for w in workflows})
        print("   the same pipeline as one workflow, intermediates by handle (classify-image):")
        for attempt in ("first", "again"):
            whole, ms = await timed(client, "classify-image", {"image": image})
            print(f"   {attempt}: {ms:7.1f} ms end to end")
        print(f"   same top-5 as step by step: {bool((whole['classes'] == top['classes']).all())}")
        broker = (await client.status("memory-broker")).details
        print(
            f"   memory broker: {broker['leases']} leases live, "
            f"pool held {broker['pools']['cpu']['held'] / 2**20:.0f} MiB"
        )

        print("4. text encoder (a small transformer)")
        sentences = ["gfaas keeps models warm on the GPU", "serverless inference without waste"]
        embeddings = []
        for text in sentences:
            out, ms = await timed(client, "text-encoder", {"tokens": tokenize(text)})
            embeddings.append(out["embedding"][0])
            print(f"   {text!r}: {out['embedding'].shape} in {ms:.1f} ms")
        print(f"   cosine similarity: {float(np.dot(embeddings[0], embeddings[1])):.4f}")

        print("5. async invocation through JetStream")
        invocation_id = await client.invoke_async("noop", {"x": np.arange(4, dtype=np.float32)})
        with anyio.fail_after(30):
            while True:
                reply = await client.result(invocation_id)
                if reply.error is None or reply.error.code not in ("pending", "not_found"):
                    break
                await anyio.sleep(0.05)
        print(f"   {invocation_id}: {outputs_of(reply)['y'].tolist()}")

        if settings.http_enabled:
            print(f"6. HTTP (KServe v2 / Triton protocol) on port {settings.http_port}")
            # With authentication on, HTTP wants a tenant's API key: the demo's own.
            key = auth.add_tenant(auth.auth_dir(settings), "demo")[1] if settings.nats_auth else ""
            # Over TLS (GFAAS_HTTP_TLS_CERT) the front's certificate is verified with
            # GFAAS_HTTP_TLS_CA, else with the system's CAs.
            scheme = "https" if settings.http_tls_cert else "http"
            async with httpx.AsyncClient(
                base_url=f"{scheme}://127.0.0.1:{settings.http_port}",
                verify=ssl.create_default_context(cafile=settings.http_tls_ca or None),
                headers={"Authorization": f"Bearer {key}"} if key else None,
            ) as http:
                with anyio.fail_after(30):
                    while True:
                        try:
                            if (await http.get("/v2/health/ready")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await anyio.sleep(0.1)
                logits_list = logits["logits"].ravel().tolist()
                response = await http.post(
                    "/v2/models/topk/infer",
                    json={
                        "inputs": [
                            {
                                "name": "logits",
                                "shape": [1, len(logits_list)],
                                "datatype": "FP32",
                                "data": logits_list,
                            }
                        ]
                    },
                )
                response.raise_for_status()
                classes = next(o for o in response.json()["outputs"] if o["name"] == "classes")
                print(f"   POST /v2/models/topk/infer -> classes {classes['data']}")
    print("demo finished: every example ran through ingress, scheduler and a worker")
    return 0
