"""Handlers the integration tests deploy (importable by in-process and subprocess workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from shared.function import LoadContext, output_buffer


def echo(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["x"]}


def add_one(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["x"] + 1}


def sleep(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    time.sleep(float(inputs["seconds"].item()))
    return {"slept": inputs["seconds"]}


def boom(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    raise ValueError("the handler failed on purpose")


def boom_a_page(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # 100 KB over a thousand lines, as a handler's exception quoting a whole log might.
    raise RuntimeError("first line\n" + "x" * 100 + ("\n" + "y" * 99) * 1000)


def not_a_mapping(inputs: dict[str, torch.Tensor]) -> Any:
    return "not tensors"


def big_output(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": torch.zeros(4 * 1024 * 1024, dtype=torch.uint8)}


class Scale:
    """A stateful handler: weights loaded once from the model store."""

    def __init__(self, ctx: LoadContext) -> None:
        weights = ctx.weights_file()  # the pushed file itself (fetched if need be)
        assert weights is not None
        self.factor = torch.load(weights, weights_only=True)["factor"]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": inputs["x"] * self.factor}


def double(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Writes straight into the pooled output buffer when the worker prepared one."""
    x = inputs["x"]
    buf = output_buffer("y")
    return {"y": torch.mul(x, 2, out=buf) if buf is not None else x * 2}


def hold(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sleeps with its (prepared, by-handle) output buffer leased."""
    time.sleep(float(inputs["seconds"].item()))
    return {"y": torch.ones(256)}


def slow_echo(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    time.sleep(0.3)
    return {"y": inputs["x"].clone()}


def add(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["a"] + inputs["b"]}


# Opened by tests that need a model load to stay in progress for a while.
BUILD_GATE = threading.Event()


class GatedScale(Scale):
    """`Scale`, whose load waits for BUILD_GATE (at most 10 s)."""

    def __init__(self, ctx: LoadContext) -> None:
        BUILD_GATE.wait(10)
        super().__init__(ctx)


def exit_if_negative(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Echoes x; a negative x makes it call sys.exit, as a careless handler might."""
    x = inputs["x"]
    if bool((x < 0).any()):
        raise SystemExit("the handler called sys.exit")
    return {"y": x}


def slow_boom(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    time.sleep(0.3)
    raise ValueError("the handler failed on purpose, after a while")


# What `late_reader` read, for tests whose workflow never returns its output.
SEEN: list[torch.Tensor] = []


def late_reader(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reads its input only after a while (a sibling stage may have failed by then)."""
    time.sleep(1.5)
    seen = inputs["x"].clone()
    SEEN.append(seen)
    return {"y": seen}


# Every `count_run` execution's `n`, in order: tests count how often each ran.
RUNS: list[int] = []
_RUNS_LOCK = threading.Lock()


def count_run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with _RUNS_LOCK:
        RUNS.append(int(inputs["n"].item()))
    return {"y": inputs["n"] + 1}


# Executions of `slow_count`, by `n`: tests of long async runs count them.
SLOW_RUNS: list[int] = []


def slow_count(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sleeps `seconds`, then records that it ran for `n`."""
    time.sleep(float(inputs["seconds"].item()))
    with _RUNS_LOCK:
        SLOW_RUNS.append(int(inputs["n"].item()))
    return {"y": inputs["n"] + 1}


def logged_run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Appends `n` to the file named by GFAAS_TEST_RUN_LOG (one line per execution,
    from any process), after `ms` milliseconds of work; returns n + 1."""
    time.sleep(float(inputs["ms"].item()) / 1000.0)
    n = int(inputs["n"].item())
    path = os.environ.get("GFAAS_TEST_RUN_LOG", "")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{n}\n".encode())
        finally:
            os.close(fd)
    return {"y": inputs["n"] + 1}


# No handlers: deploy refuses them (tests/test_deploy_checks.py).
NOT_A_HANDLER = 42


def two_args(inputs: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {"y": inputs["x"] * scale}


def die(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ends its process at once (a segfault, as an instance sees it); echoes x >= 0."""
    x = inputs["x"]
    if bool((x < 0).any()):
        os._exit(3)
    return {"y": x}


def spawn_child(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Starts a process it never waits for (a helper a handler leaves running) and
    answers its pid; x < 0 ends the handler's own process at once, as `die` does."""
    if bool((inputs["x"] < 0).any()):
        os._exit(3)
    child = subprocess.Popen(["sleep", "300"])
    return {"pid": torch.tensor([child.pid])}


# A daemon started the classic way: in a session (and process group) of its own, its
# parent gone (a second fork, the middle process exits), so nothing links it to the
# handler's process but who adopts it; it says its pid, then sleeps.
DAEMON = """
import os, time
os.setsid()
if os.fork():
    os._exit(0)
print(os.getpid(), flush=True)
time.sleep(300)
"""


def daemon_pid() -> int:
    """Starts DAEMON and answers its pid once the middle process has exited."""
    middle = subprocess.Popen([sys.executable, "-c", DAEMON], stdout=subprocess.PIPE)
    assert middle.stdout is not None
    with middle.stdout:
        pid = int(middle.stdout.readline())
    middle.wait()
    return pid


def spawn_daemon(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Leaves a daemon running (`daemon_pid`) and answers its pid."""
    return {"pid": torch.tensor([daemon_pid()])}


def allocate(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Allocates `mb` MiB on the instance's device (a memory cap's test)."""
    mb = int(inputs["mb"].item())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = torch.empty(mb * 1024 * 1024, dtype=torch.uint8, device=device)
    return {"bytes": torch.tensor([block.numel()])}


class SlowMlp:
    """bench.live_models' MLP, each call held `hold_s` seconds (input `hold_s`), so
    that concurrent calls spread over several instances."""

    def __init__(self, ctx: LoadContext) -> None:
        from bench.live_models import Mlp

        self.mlp = Mlp(ctx)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        time.sleep(float(inputs["hold_s"].item()))
        return self.mlp({"x": inputs["x"]})


def _text(data: bytes | str) -> torch.Tensor:
    raw = data.encode() if isinstance(data, str) else data
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if raw
        else torch.empty(0, dtype=torch.uint8)
    )


def whoami(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Who the handler runs as (uid, euid, gid), where (its working directory, HOME),
    what reading the file `path` (bytes) gave it (the bytes, or the error's name), and
    what trying to become root again gave (issue 10: handlers with least privilege)."""
    path = bytes(inputs["path"].tolist()).decode()
    try:
        with open(path, "rb") as f:
            read = f.read()
    except OSError as exc:
        read = type(exc).__name__.encode()
    try:
        os.setuid(0)
        back = "root"
    except PermissionError:
        back = "PermissionError"
    return {
        "ids": torch.tensor([os.getuid(), os.geteuid(), os.getgid()]),
        "cwd": _text(os.getcwd()),
        "home": _text(os.environ.get("HOME", "")),
        "read": _text(read),
        "setuid": _text(back),
    }


def not_as_root(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`x` doubled, and the user it ran as; it refuses to run as root (issue 10: a
    node that isolates handler code runs none as root, a profile's runs included)."""
    if os.geteuid() == 0:
        raise RuntimeError("this handler ran as root")
    return {"y": inputs["x"] * 2, "uid": torch.tensor([os.geteuid()])}


def process_cores() -> int:
    """The cores this process was given: its main thread's affinity (a thread pinned
    for a moment, as the agent's profiler pins its own, does not change it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                ranges = line.split(":", 1)[1].strip().split(",")
                return sum(
                    int(b) - int(a) + 1 if "-" in r else 1
                    for r in ranges
                    for a, _, b in [r.partition("-")]
                )
    return len(os.sched_getaffinity(0))


def wait_per_core(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Waits 30 ms divided by the cores its process has: a run whose latency tells
    which share its process was given, without burning the CPU a test shares."""
    cores = process_cores()
    time.sleep(0.03 / cores)
    return {"cores": torch.tensor([cores], dtype=torch.int32)}


# Set by Linear4's model factory: its skeleton is being built (tests of parallel setup).
SKELETON_BUILT = threading.Event()


def linear4() -> torch.nn.Module:
    SKELETON_BUILT.set()
    return torch.nn.Linear(4, 4)


class Linear4:
    """x [n, 4] -> y [n, 4] through one Linear built with `ctx.build` (a handler that
    knows its architecture, so its skeleton needs no weights)."""

    def __init__(self, ctx: LoadContext) -> None:
        self.model = ctx.build(linear4)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"y": self.model(inputs["x"])}


class SlowToLoad:
    """Echoes x; its load takes a second (a model being built), so an instance of it
    is still starting when the invocation that woke it arrives."""

    def __init__(self, ctx: LoadContext) -> None:
        time.sleep(1.0)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": inputs["x"]}


class SlowerToLoad(SlowToLoad):
    """Echoes x; its load takes two seconds: time to kill its instance while it
    starts, holding the invocation that woke it."""

    def __init__(self, ctx: LoadContext) -> None:
        time.sleep(2.0)


class FailsAfterASecond:
    """A handler whose load fails a second in, after its instance took the request."""

    def __init__(self, ctx: LoadContext) -> None:
        time.sleep(1.0)
        raise RuntimeError("the model could not be built")

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise AssertionError("never loaded")


class NeverBuilds:
    """A class handler whose build does not return (waiting on something that never
    comes): its instance never becomes ready."""

    def __init__(self, ctx: LoadContext) -> None:
        time.sleep(3600.0)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return inputs


def many_outputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`x` again under 520 names, o0 to o519: a stage with as many intermediates."""
    return {f"o{i}": inputs["x"] for i in range(520)}


def ones_64k(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """64 KiB of float32 ones, whatever it is given."""
    return {"y": torch.ones(16384)}


def sum_all(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sum of all its inputs, however many."""
    return {"y": torch.stack(list(inputs.values())).sum(dim=0)}


def echo_and_more(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`y` as echo has it, and an output `extra` besides."""
    return {"y": inputs["x"], "extra": inputs["x"].sum()}


def as_int32(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`x` as int32: as many bytes as a float32 `y` of its shape, another dtype."""
    return {"y": inputs["x"].to(torch.int32)}


def numpy_total(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The sum of `x` as a 0-d numpy array (a scalar: shape [])."""
    return {"y": np.asarray(inputs["x"].sum().item(), dtype=np.float32)}
