"""Host tier in shared memory and pipelined swap-in (CPU backend)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from shared.dataplane.shm import SHM_DIR, create_segment
from shared.modelswap import HostTier, instantiate
from shared.modelswap.host_tier import PREFIX, segment_name, write_blob
from shared.modelswap.pipeline import SwapError, _NoInit, group_parameters
from tests.platform import PYTHON, subprocess_env

pytestmark = pytest.mark.unit


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.LayerNorm(512),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


@pytest.fixture
def tier() -> Iterator[HostTier]:
    tier = HostTier(prefix=PREFIX + "test-")
    yield tier
    tier.purge()


@pytest.fixture
def weights(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = mlp().eval()
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_host_tier_loads_once_and_maps_zero_copy(
    tier: HostTier, weights: tuple[nn.Module, Path]
) -> None:
    reference, path = weights
    loads: list[int] = []

    def load() -> Path:
        loads.append(1)
        return path

    host = tier.get_or_load("mlp-test", "d1", load)
    again = tier.get_or_load("mlp-test", "d1", load)
    assert loads == [1]
    assert again is host
    for name, tensor in reference.state_dict().items():
        assert torch.equal(host.tensors[name], tensor)
    assert host.nbytes == sum(t.numel() * 4 for t in reference.state_dict().values())


def test_another_process_attaches_to_the_same_copy(
    tier: HostTier, weights: tuple[nn.Module, Path]
) -> None:
    _, path = weights
    host = tier.get_or_load("mlp-test", "d2", lambda: path)
    code = (
        "from shared.modelswap import HostTier\n"
        "from shared.modelswap.host_tier import PREFIX\n"
        "t = HostTier(prefix=PREFIX + 'test-')\n"
        "h = t.cached('mlp-test', 'd2')\n"
        "print(float(h.tensors['0.weight'].sum()))\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(host.tensors["0.weight"].sum()), rel=1e-5)
    # The attaching process exited: the segment must still be there (no resource tracker).
    assert segment_name("mlp-test", "d2", tier.prefix) in tier.resident()


@pytest.mark.parametrize("pipelined", [True, False])
def test_swapped_in_model_computes_what_the_original_does(
    tier: HostTier, weights: tuple[nn.Module, Path], pipelined: bool
) -> None:
    reference, path = weights
    host = tier.get_or_load("mlp-test", "d3", lambda: path)
    model, swap = instantiate(mlp, host, "cpu", group_bytes=64 * 1024, pipelined=pipelined)
    assert len(swap.groups) > 3
    x = torch.randn(4, 256)
    with torch.inference_mode():
        out = model(x)  # may run while later groups are still copying
        swap.wait()
        torch.testing.assert_close(out, reference(x))
    swap.detach_hooks()
    assert swap.done
    assert swap.seconds > 0


def test_weights_that_do_not_fit_the_model_are_refused(
    tier: HostTier, weights: tuple[nn.Module, Path]
) -> None:
    _, path = weights
    host = tier.get_or_load("mlp-test", "d4", lambda: path)
    with pytest.raises(SwapError, match="missing"):
        instantiate(lambda: nn.Linear(3, 3), host, "cpu")


@pytest.mark.parametrize("pipelined", [True, False])
def test_weights_of_another_shape_are_refused_not_broadcast(
    tier: HostTier, tmp_path: Path, pipelined: bool
) -> None:
    # A [1, 8] weight and a bias of one broadcast into nn.Linear(8, 8)'s: the model
    # would answer with every output equal instead of refusing, as
    # load_state_dict does for the same file.
    path = tmp_path / "narrow.pt"
    torch.save({"weight": torch.ones(1, 8), "bias": torch.zeros(1)}, path)
    host = tier.get_or_load("narrow-test", "d6", lambda: path)
    with pytest.raises(SwapError, match=r"weight is \[1, 8\], the model wants \[8, 8\]"):
        instantiate(lambda: nn.Linear(8, 8), host, "cpu", pipelined=pipelined)


def test_evict_removes_the_segment(tier: HostTier, weights: tuple[nn.Module, Path]) -> None:
    _, path = weights
    tier.get_or_load("mlp-test", "d5", lambda: path)
    assert tier.evict("mlp-test", "d5")
    assert tier.cached("mlp-test", "d5") is None
    assert tier.resident() == []


def test_groups_pack_consecutive_tensors_to_the_size() -> None:
    tensors = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    groups = group_parameters(tensors, 3 * 1024)
    assert groups == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6", "t7", "t8"], ["t9"]]
    assert group_parameters([("big", torch.zeros(4096))], 1024) == [["big"]]


class _Seen(TorchFunctionMode):
    """Records the torch functions that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_a_model_built_on_the_meta_device_is_not_initialised_but_real_ones_are() -> None:
    """Initialising weights on the meta device computes nothing but costs dispatch
    (half of building a 1,000-layer MLP): instantiate skips it. Tensors on a real
    device are initialised as ever, under the same mode."""
    seen = _Seen()
    with torch.device("meta"), seen, _NoInit():
        nn.Linear(8, 8)
    assert "empty" in seen.names
    fills = [n for n in seen.names if n.endswith("_") and not n.endswith("__")]
    assert not fills, seen.names
    plain = _Seen()
    with torch.device("meta"), plain:
        nn.Linear(8, 8)
    assert "kaiming_uniform_" in plain.names  # what the mode keeps from the dispatch
    with _NoInit():
        real = nn.Linear(8, 8)
        ones = torch.empty(3).fill_(1.0)
    assert bool(real.weight.abs().sum() > 0)
    assert ones.tolist() == [1.0, 1.0, 1.0]


def _resident_kib(name: str) -> int:
    """This process's resident KiB of its mapping of /dev/shm/`name`."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(f"/dev/shm/{name}"):
            for field in lines[i + 1 :]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError(f"{name} is not mapped")


def test_a_segment_being_filled_has_its_pages_before_the_bytes_arrive(tier: HostTier) -> None:
    """A fill from the object store writes into a fresh segment as the chunks arrive;
    its pages are allocated ahead of it in a thread, not faulted in per 4 KiB by the
    writer (71 ms per 100 MB here)."""
    size = 16 * 1024 * 1024
    pending = tier.pending("prefaulted", "d1", size)
    try:
        assert pending.populating is not None
        pending.populating.join(timeout=10)
        assert _resident_kib(pending.tmp) >= size // 1024 - 4
    finally:
        pending.abort()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a segment to another user: root only")
def test_a_segment_another_user_left_under_a_models_name_is_not_taken_for_it(
    weights: tuple[nn.Module, Path],
) -> None:
    """/dev/shm is open to every user: a handler running as the handler user can leave
    a file of its own under the segment name of a model before the agent fills it.
    The agent (and every instance) took it for the model (before: its weights went
    into every function that loads that model, and its maker could go on writing
    them); now a segment is the tier's only when its writer's user or root owns it,
    and the fill replaces any other."""
    reference, path = weights
    tier = HostTier(prefix=f"{PREFIX}test-{os.getpid()}-planted-")
    name = segment_name("mlp-test", "d1", tier.prefix)
    planted = SHM_DIR / name
    try:
        poison = {k: torch.full_like(v, 7.0) for k, v in reference.state_dict().items()}
        write_blob(poison, planted)
        os.chown(planted, 65534, 65534)
        assert tier.cached("mlp-test", "d1") is None
        assert HostTier(tier.prefix, readonly=True).cached("mlp-test", "d1") is None
        host = tier.get_or_load("mlp-test", "d1", lambda: path)
        for key, tensor in reference.state_dict().items():
            assert torch.equal(host.tensors[key], tensor)
        assert planted.stat().st_uid == 0  # the fill's own segment now
        reader = HostTier(tier.prefix, readonly=True).cached("mlp-test", "d1")
        assert reader is not None
        assert torch.equal(next(iter(reader.tensors.values())), next(iter(host.tensors.values())))
    finally:
        tier.purge()
        planted.unlink(missing_ok=True)


_FILL_OVER_ROOM = """
import os, sys
from pathlib import Path
import torch
import shared.dataplane.shm as shm
import shared.modelswap.host_tier as ht
shm.SHM_DIR = ht.SHM_DIR = Path(sys.argv[1])
ht.LOCK_DIR = shm.SHM_DIR / ".gfaas-locks"
weights = Path(sys.argv[2])
torch.save({"w": torch.ones(1024 * 1024)}, weights)  # 4 MiB, in a 1 MiB /dev/shm
try:
    ht.HostTier(prefix="gfaas-model-test-").get_or_load("big", "d1", lambda: weights)
except Exception as exc:
    print(type(exc).__name__, exc)
print(sorted(n for n in os.listdir(shm.SHM_DIR) if not n.startswith(".")))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: root only")
def test_a_model_larger_than_the_room_in_dev_shm_is_refused_not_a_crash(
    tmp_path: Path,
) -> None:
    """A model's segment is reserved before it is written: with less room left in
    /dev/shm than the model needs, the load fails with why and leaves no segment
    (before, the write into the segment past the room was a SIGBUS: the agent died
    and its half-written segment stayed)."""
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(shm_dir)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        done = subprocess.run(
            [PYTHON, "-c", _FILL_OVER_ROOM, str(shm_dir), str(tmp_path / "big.pt")],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["umount", str(shm_dir)], check=True)
    assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"
    refusal, left = done.stdout.strip().splitlines()
    assert refusal.startswith("BackendError no room in"), refusal
    assert left == "[]"


def test_a_fill_removes_what_a_killed_fill_of_the_model_left(
    weights: tuple[nn.Module, Path],
) -> None:
    """A process killed while it filled a model leaves its temporary segment (the
    bytes so far, in /dev/shm until the node stops: before, every killed fill of a
    model added one); the next fill of that model, holding its lock, removes it."""
    _, path = weights
    tier = HostTier(prefix=f"{PREFIX}test-{os.getpid()}-stale-")
    name = segment_name("mlp-test", "d1", tier.prefix)
    left = f"{name}.tmp999999-1"
    other = segment_name("other", "d1", tier.prefix) + ".tmp999999-1"
    try:
        for stale in (left, other):
            create_segment(stale, 4096).close()
        tier.get_or_load("mlp-test", "d1", lambda: path)
        assert tier.resident() == sorted([name, other])  # another model's: not this fill's
    finally:
        tier.purge()


def test_a_pinned_segment_is_unpinned_when_the_tier_lets_go_of_it(
    weights: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment page-locked for a device's copies is unregistered when the tier
    evicts it or closes (before, it stayed registered: its pages locked in the
    process after the eviction, and a new segment mapped at the same address was
    taken for pinned already). No GPU: the CUDA runtime's calls are recorded."""
    from shared.modelswap import cuda

    calls: list[tuple[str, int]] = []

    class Runtime:
        def cudaHostRegister(self, ptr: int, size: int, flags: int) -> None:
            calls.append(("register", ptr))

        def cudaHostUnregister(self, ptr: int) -> None:
            calls.append(("unregister", ptr))

    monkeypatch.setattr(torch.cuda, "cudart", Runtime)
    _, path = weights
    tier = HostTier(prefix=f"{PREFIX}test-{os.getpid()}-pinned-")
    try:
        host = tier.get_or_load("mlp-test", "d1", lambda: path)
        cuda.pin(host)
        cuda.pin(host)  # once per mapping
        ptr = torch.frombuffer(host.segment.mm, dtype=torch.uint8).data_ptr()
        assert calls == [("register", ptr)]
        tier.evict("mlp-test", "d1")
        assert calls == [("register", ptr), ("unregister", ptr)]
        assert ptr not in cuda._registered
        again = tier.get_or_load("mlp-test", "d2", lambda: path)
        cuda.pin(again)  # a new mapping, wherever it lies: registered
        tier.close()
        assert [c for c, _ in calls] == ["register", "unregister", "register", "unregister"]
    finally:
        tier.purge()


def test_threads_that_find_a_model_at_once_share_one_mapping(
    weights: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loads run in threads: two that look for a model in the tier at once get the
    one mapping the tier keeps (before, each mapped the segment, and the one the tier
    did not keep outlived its eviction)."""
    import threading
    import time

    import shared.modelswap.host_tier as host_tier

    _, path = weights
    tier = HostTier(prefix=f"{PREFIX}test-{os.getpid()}-threads-")
    try:
        tier.get_or_load("mlp-test", "d1", lambda: path)
        tier._open.clear()  # mapped by another process: this one has not mapped it yet
        real_open = host_tier.open_trusted

        def slow_open(name: str, *, readonly: bool = False) -> Any:
            time.sleep(0.2)  # both threads are looking meanwhile
            return real_open(name, readonly=readonly)

        monkeypatch.setattr(host_tier, "open_trusted", slow_open)
        found: list[object] = []
        threads = [
            threading.Thread(target=lambda: found.append(tier.cached("mlp-test", "d1")))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert found[0] is not None
        assert found[0] is found[1]
    finally:
        tier.purge()
