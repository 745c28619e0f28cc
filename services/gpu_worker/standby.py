"""A pre-started instance process: `python -m services.gpu_worker.standby`.

It pays what every instance pays before it knows its function (the interpreter,
torch and gfaas imported) and then waits on stdin for its assignment: one line of
JSON, the GFAAS_* (and CUDA_MPS_*) environment of the instance it becomes. It has
no CUDA context yet (nothing here touches the device), so an MPS share or a memory
cap set by the assignment still applies; its cores are pinned by the instance's
settings before torch's first operation. EOF instead of a line: it was not needed,
and exits.
"""

from __future__ import annotations

import json
import os
import sys

# The imports an instance needs, paid before the assignment.
from services.gpu_worker.app import serve
from shared.config import settings_from_env
from shared.service import run_service


def warm_up() -> None:
    """What a first model build pays once per process, paid before the assignment:
    materialising a module built on the meta device imports torch's symbolic-shape
    machinery (sympy: about 0.4 s here), and a first forward its kernels' set-up."""
    import torch

    layer = torch.nn.Linear(4, 4, device="meta").to_empty(device="cpu")
    with torch.inference_mode():
        layer(torch.ones(1, 4))


def main() -> int:
    warm_up()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the agent stopped, or no longer wants a spare
    env = json.loads(line)
    if not isinstance(env, dict):
        print("standby: the assignment must be a JSON object", file=sys.stderr)
        return 2
    os.environ.update({str(k): str(v) for k, v in env.items()})
    run_service("gpu-worker", serve, settings_from_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
