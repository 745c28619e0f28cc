"""`gfaas up` beside another on the host: its own shared-memory names and state directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfaas.supervisor import StateDirInUse, Supervisor, plan_children
from shared.config import Settings

pytestmark = [pytest.mark.unit]

URL = "nats://127.0.0.1:4222"


def namespaces(state_dir: Path) -> set[str]:
    children = plan_children(Settings(state_dir=state_dir), URL, workers=1)
    return {c.env["GFAAS_SHM_NAMESPACE"] for c in children}


def test_two_platforms_on_one_host_name_their_segments_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every `gfaas up` named its segments gfaas-...: a second platform (its own ports
    # and state directory, as the README's "other ports" runs one) recreated the
    # first's lease board gfaas-board-local at its start and removed it, and the host
    # tier of weights, at its stop, under the first's running services.
    monkeypatch.delenv("GFAAS_SHM_NAMESPACE", raising=False)
    (first,) = namespaces(tmp_path / "a")
    (second,) = namespaces(tmp_path / "b")
    assert first != second
    assert first.startswith("gfaas-")
    assert second.startswith("gfaas-")
    # The same state directory, the same names: a restarted platform removes what a
    # killed one left (the broker does at its start, by exact name).
    assert namespaces(tmp_path / "a") == {first}
    # Given (GFAAS_SHM_NAMESPACE, read into the settings), it is kept.
    monkeypatch.setenv("GFAAS_SHM_NAMESPACE", "mine")
    children = plan_children(Settings(state_dir=tmp_path, shm_namespace="mine"), URL, workers=1)
    assert {c.env["GFAAS_SHM_NAMESPACE"] for c in children} == {"mine"}


def test_a_second_up_on_a_running_platforms_state_directory_is_refused(tmp_path: Path) -> None:
    # It started a second NATS server on the first's JetStream store, rewrote the
    # first's server config and pid file (`gfaas tenant add` then signalled the
    # second's, dead, pid), and shared the first's segment names.
    settings = Settings(state_dir=tmp_path / "state")
    first = Supervisor(settings=settings, nats_url=None, nats_port=-1, workers=1)
    first._lock_state_dir()
    second = Supervisor(settings=settings, nats_url=None, nats_port=-1, workers=1)
    with pytest.raises(StateDirInUse, match=r"is the state directory of another gfaas up \(pid "):
        second.start()
    assert second.server is None  # refused before anything started
    assert second.children == []
    assert not (tmp_path / "state" / "nats").exists()
    first.stop()  # lets go of it
    third = Supervisor(settings=settings, nats_url=None, nats_port=-1, workers=1)
    third._lock_state_dir()
    third.stop()
