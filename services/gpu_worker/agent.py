"""The node agent for one device: function instances, started and stopped on command.

An instance is a process of its own (`python -m services.gpu_worker` with the
instance settings) serving one function with a share of the device:
- memory: its device tier is capped at its budget, and the agent refuses a start
  that would take the budgets on its device past `memory_total`;
- space: on a CPU, the cores at its slot (`sched_setaffinity` in the instance,
  torch threads to match); on a GPU, CUDA MPS's active thread percentage, set in
  the environment its CUDA context is created with, when the agent could start the
  MPS control daemon; without MPS, only time is shared, and the beat says why;
- time: the device's token arbiter lives here; an instance runs a batch only while
  it holds a grant (`acquire`) and charges what the batch used (`release`);
- privilege: run as root with a handler user (GFAAS_HANDLER_USER), an instance runs as
  that user in a directory of its own, removed when it is gone (privileges.py).

The scheduler decides (shared.scheduling.autoscale and packing); the agent does, and
says in its beat (`AgentBeat`, every heartbeat) what runs, so the scheduler's view
converges on what is true, crashes included.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.gpu_worker import device_weights, limits
from services.gpu_worker.bundles import Bundles
from services.gpu_worker.privileges import PROFILE_FILE, InstanceDirs, read_own_file, uid_range
from services.gpu_worker.profiler import share_grid
from shared import auth, subjects
from shared.codebundle import BundleError, parse_ref
from shared.config import Settings, settings_env
from shared.dataplane import access
from shared.dataplane.access import HandlerUser
from shared.errors import GfaasError, clipped, described
from shared.logs import get_logger
from shared.procs import die_with_parent
from shared.scheduling import packing
from shared.scheduling.autoscale import Config
from shared.schema import (
    AgentBeat,
    AgentReply,
    ErrorCode,
    ErrorInfo,
    FunctionSpec,
    InstanceFailed,
    InstanceInfo,
    InstanceState,
    Profile,
    ProfileReply,
    StartInstance,
    StopInstance,
    TokenAcquire,
    TokenGrant,
    TokenRelease,
    WorkerHeartbeat,
    decode,
    encode,
    is_valid_token,
    now_millis,
)
from shared.sharing import ShareError, mps
from shared.sharing.cpu import cores_at, node_cores
from shared.sharing.runner import TokenRunner
from shared.sharing.tokens import TokenArbiter

if TYPE_CHECKING:
    from shared.modelswap import HostModel
    from shared.modelswap.device_share import DeviceCopies

log = get_logger("gpu_worker")

MB = 1024 * 1024
# A failed start stays in the beats this long: the scheduler answers the callers
# waiting for that instance with its error, and does not start it again at once.
FAILED_KEPT_S = 10.0
# A busy instance's next batch asks over the bus, a few ms after its charge: for this
# long after a charge it still counts as asking, so that the instances behind it in
# rank do not slip in between its batches (see TokenArbiter).
LINGER_S = 0.005
# How long a stopping instance may drain before it is killed.
STOP_GRACE_S = 20.0


def demand_of(c: StartInstance) -> packing.Demand:
    """What an instance holds, as the packer counts it."""
    return packing.Demand(
        instance_id=c.instance_id,
        function=c.function,
        model=c.model or c.function,
        config=Config(c.sm_share, c.time_quota),
        memory=c.memory_bytes,
        weights=c.weight_bytes,
    )


@dataclass
class Running:
    command: StartInstance
    process: subprocess.Popen[bytes] | None
    cores: frozenset[int]
    started: float
    state: InstanceState = InstanceState.STARTING
    ready_s: float = 0.0
    error: ErrorInfo | None = None
    stop_at: float = 0.0  # when a stopping one is killed
    gone_at: float = 0.0  # when a failed one is forgotten
    uid: int = 0  # the user its process runs as
    directory: Path | None = None  # its working directory, when the agent made one
    # Its code bundle is being fetched and extracted (`Agent.prepare`): no process yet.
    preparing: bool = False

    def info(self) -> InstanceInfo:
        c = self.command
        return InstanceInfo(
            instance_id=c.instance_id,
            function=c.function,
            sm_share=c.sm_share,
            time_quota=c.time_quota,
            memory_bytes=c.memory_bytes,
            state=self.state,
            pid=self.process.pid if self.process is not None else 0,
            cores=sorted(self.cores),
            ready_s=round(self.ready_s, 3),
            error=self.error,
            version=c.version,
            model=c.model,
            weight_bytes=c.weight_bytes,
            gated=c.gated,
        )

    def demand(self) -> packing.Demand:
        return demand_of(self.command)


class Spares:
    """Pre-started instance processes (services/gpu_worker/standby.py): a start takes
    one and assigns it, so no request waits for an interpreter and torch to load."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.procs: list[subprocess.Popen[bytes]] = []
        self.leaving: list[subprocess.Popen[bytes]] = []
        self.taken = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # Instances share cores with each other and with the node's services: torch's
        # OpenMP threads spinning at every barrier made a 100-layer MLP's first call
        # take 1 s instead of 40 ms here (read by OpenMP when torch loads: set now).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return subprocess.Popen(
            [sys.executable, "-m", "services.gpu_worker.standby"],
            stdin=subprocess.PIPE,
            env=env,
            preexec_fn=die_with_parent,
        )

    def take(self) -> subprocess.Popen[bytes] | None:
        while self.procs:
            proc = self.procs.pop(0)
            if proc.poll() is None:
                self.taken += 1
                return proc
        return None

    @staticmethod
    def assign(proc: subprocess.Popen[bytes], env: dict[str, str]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(env).encode() + b"\n")
        proc.stdin.close()

    def keep(self, wanted: bool) -> None:
        """Up to `size` spares while instances are wanted on this node; none else."""
        self.procs = [p for p in self.procs if p.poll() is None]
        self.leaving = [p for p in self.leaving if p.poll() is None]
        if not wanted:
            for proc in self.procs:
                if proc.stdin is not None:
                    proc.stdin.close()  # EOF: it exits (reaped by a later call)
            self.leaving += self.procs
            self.procs = []
            return
        while len(self.procs) < self.size:
            self.procs.append(self.spawn())

    def close(self) -> None:
        """Every spare gone (blocking: from a thread). Terminated, not sent EOF: a
        spare still importing reads its stdin only once warmed up (seconds here),
        and holds nothing that needs a clean exit."""
        for proc in [*self.procs, *self.leaving]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.procs, *self.leaving]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        self.procs, self.leaving = [], []


@dataclass
class Spatial:
    """How spatial shares are enforced on this device."""

    mode: str  # "cores", "mps", or "time only: <why>"
    mps_dirs: mps.MpsDirs | None = None
    started_daemon: bool = False


def spatial_for(device: str, state_dir: Path) -> Spatial:
    """Cores on a CPU; on a GPU, MPS when its daemon runs or can be started here."""
    if not device.startswith("cuda"):
        return Spatial("cores")
    dirs = mps.MpsDirs.under(state_dir / "mps")
    status = mps.probe(dirs)
    if status.running:
        return Spatial("mps", dirs)
    try:
        index = device.split(":", 1)[1] if ":" in device else "0"
        mps.start_daemon(dirs, devices=index)
    except (mps.MpsUnavailable, OSError, subprocess.SubprocessError) as exc:
        reason = f"time only: {clipped(str(exc))}"
        log.warning("agent.no_mps", device=device, reason=reason)
        return Spatial(reason)
    return Spatial("mps", dirs, started_daemon=True)


class Agent:
    def __init__(
        self,
        nc: NATS,
        settings: Settings,
        *,
        agent_id: str,
        device: str,
        memory_total: int,
        spatial: Spatial,
        clock: Callable[[], float] = time.monotonic,
        handler_user: HandlerUser | None = None,
        bundles: Bundles | None = None,
    ) -> None:
        self.nc = nc
        # Where instances' code bundles come from (None: this agent starts none).
        self.bundles = bundles
        self.settings = settings
        self.agent_id = agent_id
        self.device = device
        self.memory_total = memory_total
        self.spatial = spatial
        self.clock = clock
        self.cores = node_cores()
        self.runner = TokenRunner(TokenArbiter(settings.token_window_s, linger_s=LINGER_S), clock)
        self.instances: dict[str, Running] = {}
        # Pending token requests: a release that comes first (its instance gave up
        # waiting) cancels the wait.
        self._waits: dict[str, anyio.CancelScope] = {}
        self.started = 0
        self.crashed = 0
        self.spares = Spares(settings.agent_spares)
        # Who instances run as (None: this agent's user), and their directories.
        self.handler_user = handler_user
        self.dirs = (
            InstanceDirs.under(settings.state_dir, agent_id, handler_user)
            if handler_user is not None
            else None
        )
        # Each instance its own uid from this range (GFAAS_HANDLER_UIDS), if given;
        # those profile runs hold meanwhile.
        self.uids = uid_range(settings.handler_uids) if handler_user is not None else None
        self._lent_uids: set[int] = set()
        # Deployed models in the node's host tier, for the beat (the worker's
        # prefetcher knows them: services/gpu_worker/prefetch.py).
        self.host_models: Callable[[], Collection[str]] = tuple
        # On a GPU, the device's one copy of each model its instances share
        # (services/gpu_worker/device_weights.py); on a CPU the host tier is that copy.
        self.copies: DeviceCopies | None = None
        if device.startswith("cuda") and settings.shared_weights:
            from shared.modelswap.device_share import DeviceCopies

            self.copies = DeviceCopies()

    # -- commands ---------------------------------------------------------------------

    @property
    def isolated(self) -> bool:
        """Does handler code run here only as the handler user? Then it runs only in
        instance processes (which switch to that user before importing any of it):
        the agent's own process, root, runs none, not even a profile's."""
        return self.handler_user is not None

    @property
    def shares_weights(self) -> bool:
        """Instances of one model here map one copy of its weights: the host tier's
        shared memory, read-only (CPU), or one device copy this agent holds and
        exports over CUDA IPC (`copies`)."""
        return self.settings.shared_weights and (self.device == "cpu" or self.copies is not None)

    def model_of(self, instance_id: str) -> str | None:
        """The model an instance here was started with (None: no such instance, or
        one that failed)."""
        running = self.instances.get(instance_id)
        if running is None or running.state is InstanceState.FAILED:
            return None
        return running.command.model

    def _holding(self) -> list[packing.Demand]:
        return [r.demand() for r in self.instances.values() if r.state is not InstanceState.FAILED]

    def memory_used(self) -> int:
        """The budgets of the instances here (the packer's sum: shared weights once)."""
        return packing.memory_used(self._holding(), self.shares_weights)

    def weights(self) -> dict[str, dict[str, int]]:
        """Per model: the bytes of weights its instances here hold, and how many they
        are (shared: one copy for all; else one each). Density, visible."""
        out: dict[str, dict[str, int]] = {}
        for d in self._holding():
            if not d.weights:
                continue
            row = out.setdefault(d.model, {"bytes": 0, "instances": 0})
            row["instances"] += 1
            row["bytes"] = (
                max(row["bytes"], d.weights) if self.shares_weights else (row["bytes"] + d.weights)
            )
        return out

    def refusal(self, cmd: StartInstance) -> str | None:
        if cmd.instance_id in self.instances:
            return f"instance {cmd.instance_id} already exists"
        if not is_valid_token(cmd.instance_id):
            return f"instance id {cmd.instance_id!r} is not a subject token"
        if cmd.memory_bytes < 0 or cmd.weight_bytes < 0:
            # A negative budget would count as memory freed: the starts after it
            # could then take the device past `memory_total`.
            return (
                f"{cmd.function}: memory must not be negative (memory_bytes "
                f"{cmd.memory_bytes}, weight_bytes {cmd.weight_bytes})"
            )
        free = self.memory_total - self.memory_used()
        held = self._holding()
        with_it = packing.memory_used([*held, demand_of(cmd)], self.shares_weights)
        needs = with_it - packing.memory_used(held, self.shares_weights)
        if needs > free:
            return (
                f"{cmd.function}: {needs // MB} MiB would overcommit {self.device} "
                f"of {self.agent_id} ({free // MB} of {self.memory_total // MB} MiB free)"
            )
        if not (0.0 < cmd.sm_share <= 1.0 and 0.0 < cmd.time_quota <= 1.0):
            return f"shares must be in (0, 1]: sm {cmd.sm_share}, time {cmd.time_quota}"
        return None

    def start(self, cmd: StartInstance) -> AgentReply:
        reason = self.refusal(cmd)
        cores: frozenset[int] = frozenset()
        if reason is None and self.spatial.mode == "cores":
            try:
                cores = cores_at(cmd.sm_offset, cmd.sm_share, self.cores)
            except ShareError as exc:
                reason = str(exc)
        if reason is None:
            try:
                # The quota is the instance's slot of every window, and its cap: the
                # packer gave that time to it alone, and the rest to others.
                self.runner.arbiter.add(
                    cmd.instance_id,
                    base=cmd.time_quota,
                    maximum=cmd.time_quota,
                    sm=cmd.sm_share,
                )
            except ShareError as exc:
                reason = str(exc)
        if reason is not None:
            log.warning("instance.refused", instance=cmd.instance_id, reason=reason)
            return AgentReply(error=ErrorInfo(code=ErrorCode.OVERLOADED, reason=reason))
        if cmd.code:
            # Its code bundle first (`prepare`, which may take seconds: not before the
            # answer), then its process; in the books, and its share held, meanwhile.
            running = Running(cmd, None, cores, self.clock(), preparing=True)
            self.instances[cmd.instance_id] = running
            self.started += 1
            log.info("instance.preparing", instance=cmd.instance_id, code=cmd.code)
            return AgentReply()
        error = self._launch(cmd, cores)
        return AgentReply(error=error)

    async def prepare(self, instance_id: str) -> None:
        """The code bundle of a started instance fetched, verified and extracted
        (services/gpu_worker/bundles.py), then its process assigned; a bundle that
        cannot be had fails the start with the reason, as an instance that could not
        load its handler does (its callers and the beats say why)."""
        running = self.instances.get(instance_id)
        if running is None:
            return
        cmd = running.command
        error = None
        try:
            if self.bundles is None:
                raise BundleError("this agent has no code store to fetch it from")
            await self.bundles.ready(cmd.code)
        except BundleError as exc:
            error = ErrorInfo(
                code=ErrorCode.HANDLER_ERROR, reason=f"{cmd.function}: {clipped(str(exc))}"
            )
        except Exception as exc:  # the store unreachable: the platform's fault, not the spec's
            reason = f"{cmd.function}: its code bundle could not be fetched: {described(exc)}"
            error = ErrorInfo(code=ErrorCode.INTERNAL, reason=reason)
        if self.instances.get(instance_id) is not running:
            return  # gone meanwhile (the agent stops): nothing to start
        if running.state is not InstanceState.STARTING:
            return  # stopped meanwhile: nothing to start
        if error is None:
            error = self._launch(cmd, running.cores, running)
        if error is not None:
            self._fail(running, error)

    def _fail(self, running: Running, error: ErrorInfo) -> None:
        """A start that failed before its process ran: kept in the beats a while."""
        running.preparing = False
        running.state = InstanceState.FAILED
        running.error = error
        running.gone_at = self.clock() + FAILED_KEPT_S
        self.runner.remove(running.command.instance_id)
        log.warning(
            "instance.start_failed",
            instance=running.command.instance_id,
            function=running.command.function,
            code=error.code,
            reason=error.reason,
        )

    def _launch(
        self, cmd: StartInstance, cores: frozenset[int], running: Running | None = None
    ) -> ErrorInfo | None:
        """An instance process (a spare, or one started now) assigned `cmd`; the
        instance in the books (`running`, when it is there already). The reason when
        no process could be started."""
        directory = None
        process: subprocess.Popen[bytes] | None = None
        try:
            uid = self._instance_uid()
            directory = self.dirs.create(cmd.instance_id, uid) if self.dirs is not None else None
            # A spare that imported everything already, or a process started now.
            process = self.spares.take() or self.spares.spawn()
            self._limit(process, cmd.memory_bytes)
            self.spares.assign(process, self._assignment(cmd, cores, directory, uid))
        except Exception as exc:  # an OSError, or a bug: one start fails, not the agent
            if not isinstance(exc, OSError):
                log.exception("instance.launch_failed", instance=cmd.instance_id)
            if process is not None:
                with process:  # its pipes closed, and reaped
                    if process.poll() is None:
                        process.kill()  # never assigned, or half: it serves nothing
            self.runner.remove(cmd.instance_id)
            if directory is not None:
                InstanceDirs.remove(directory)
            reason = f"could not start the instance process: {described(exc)}"
            return ErrorInfo(code=ErrorCode.INTERNAL, reason=reason)
        if running is None:
            running = Running(cmd, process, cores, self.clock())
            self.instances[cmd.instance_id] = running
            self.started += 1
        running.process, running.preparing = process, False
        running.uid, running.directory = uid, directory
        log.info(
            "instance.starting",
            instance=cmd.instance_id,
            function=cmd.function,
            pid=process.pid,
            uid=uid,
            sm_share=cmd.sm_share,
            time_quota=cmd.time_quota,
            memory_mb=cmd.memory_bytes // MB,
            cores=sorted(cores),
        )
        return None

    def stop(self, cmd: StopInstance) -> AgentReply:
        running = self.instances.get(cmd.instance_id)
        if running is None:
            reason = f"no instance {cmd.instance_id} on {self.agent_id}"
            return AgentReply(error=ErrorInfo(code=ErrorCode.NOT_FOUND, reason=reason))
        self._terminate(running)
        return AgentReply()

    def _terminate(self, running: Running) -> None:
        if running.state in (InstanceState.STOPPING, InstanceState.FAILED):
            return
        running.state = InstanceState.STOPPING
        running.stop_at = self.clock() + STOP_GRACE_S
        if running.process is not None and running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)  # it drains, then exits
        log.info("instance.stopping", instance=running.command.instance_id)

    @property
    def profiles_per_share(self) -> bool:
        """Is each spatial share profiled in a process of its own, the share applied
        to it as to an instance? Where the device is a GPU under MPS (`auto`): an SM
        share holds for a whole process, so no one process measures several."""
        choice = self.settings.profile_per_share.strip().lower()
        if choice in ("1", "true", "yes", "on"):
            return True
        if choice in ("0", "false", "no", "off"):
            return False
        return self.device.startswith("cuda") and self.spatial.mode == "mps"

    async def profile_per_share(self, spec: FunctionSpec, timeout_s: float) -> ProfileReply:
        """`spec`'s profile, one instance process per spatial share of the grid
        (profiler.share_grid), each with that share applied as an instance's would be
        (an MPS share of the SMs, or that part of the cores): what an instance with
        the share gets, measured, not scaled from the whole device. The first error
        is the reply."""
        rows = []
        for share in share_grid(self.device, len(self.cores)):
            reply = await self.profile_in_instance(spec, timeout_s, share=share)
            if reply.profile is None:
                return reply
            rows.extend(reply.profile.rows)
        return ProfileReply(
            profile=Profile(
                function=spec.name,
                device=self.device,
                agent=self.agent_id,
                rows=rows,
                measured_at=now_millis() / 1000.0,
                spatial=self.spatial.mode if self.device.startswith("cuda") else "cores",
            )
        )

    async def profile_in_instance(
        self, spec: FunctionSpec, timeout_s: float, *, share: float = 0.0
    ) -> ProfileReply:
        """`spec`'s profile measured in an instance process of its own: on an isolated
        node (no handler code as root) as the handler user in its directory, and for a
        function with a code bundle with that bundle mounted. A spare takes the whole
        device's cores and the function's memory limits, measures the grid
        (services/gpu_worker/profile_instance.py), leaves the reply in a file and
        exits. With `share`, it runs with that spatial share applied (an MPS share on
        a GPU, the first cores of that part of them on a CPU) and measures that one
        share at each quota. Its memory is not booked against `memory_total`: it
        lasts seconds, as the agent's own profiles do."""
        run_id = f"profile-{spec.name[:40]}-{secrets.token_hex(4)}"
        cmd = StartInstance(
            instance_id=run_id,
            function=spec.name,
            sm_share=share or 1.0,
            time_quota=1.0,
            memory_bytes=spec.memory_mb * MB,
            code=spec.code,
        )
        # On a CPU the share is cores (on a GPU, MPS applies it: `_assignment`).
        cores = self.cores
        if share and not self.device.startswith("cuda"):
            cores = cores_at(0.0, share, self.cores)
        if spec.code:
            try:
                if self.bundles is None:
                    raise BundleError("this agent has no code store to fetch it from")
                await self.bundles.ready(spec.code)
            except BundleError as exc:
                error = ErrorInfo(
                    code=ErrorCode.HANDLER_ERROR, reason=f"{spec.name}: {clipped(str(exc))}"
                )
                return ProfileReply(error=error)
        # Its directory: the handler user's on an isolated node (it switches there),
        # else one of this agent's user, for the reply alone.
        isolated = self.dirs is not None
        uid = self._instance_uid()
        directory = (
            self.dirs.create(run_id, uid)
            if self.dirs is not None
            else Path(tempfile.mkdtemp(prefix="gfaas-profile-"))
        )
        self._lent_uids.add(uid)
        try:
            process = self.spares.take() or self.spares.spawn()
            try:
                self._limit(process, cmd.memory_bytes)
                env = self._assignment(cmd, cores, directory if isolated else None, uid)
                env["GFAAS_INSTANCE_PROFILE"] = str(directory / PROFILE_FILE)
                env["GFAAS_INSTANCE_PROFILE_SHARE"] = str(share)
                self.spares.assign(process, env)
                with anyio.move_on_after(timeout_s) as scope:
                    code = await anyio.to_thread.run_sync(process.wait)
            finally:
                if process.poll() is None:
                    limits.kill_instance(process)
                    # Reaped even when the agent is stopping mid-profile (a cancelled
                    # wait would leave the process to the garbage collector, running).
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(process.wait)
                limits.kill_group(process.pid)
            if scope.cancelled_caught:
                reason = f"profiling {spec.name!r} took over {timeout_s:g} s"
                error = ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, reason=reason)
                return ProfileReply(error=error)
            try:
                reply = decode(read_own_file(directory / PROFILE_FILE), ProfileReply)
            except (OSError, ValueError) as exc:
                reason = f"the profile process of {spec.name!r} exited {code} without a profile"
                log.warning("profile.lost", function=spec.name, exit_code=code, error=repr(exc))
                return ProfileReply(error=ErrorInfo(code=ErrorCode.INTERNAL, reason=reason))
        finally:
            InstanceDirs.remove(directory)
            self._lent_uids.discard(uid)
        if reply.profile is not None:
            # What the process could not know: whose device, and how SM shares are
            # enforced on it.
            reply.profile.agent = self.agent_id
            if self.device.startswith("cuda"):
                reply.profile.spatial = self.spatial.mode
        return reply

    def _limit(self, process: subprocess.Popen[bytes], memory_bytes: int) -> None:
        """An instance process's limits (open files; on a CPU, memory past its budget)."""
        limits.apply(
            process.pid,
            limits.instance_limits(
                self.device,
                memory_bytes,
                files=self.settings.instance_max_files,
                slack_mb=self.settings.instance_memory_slack_mb,
            ),
        )

    def _instance_uid(self) -> int:
        """The uid a new instance runs as: this agent's without a handler user, the
        handler user's, or the first of GFAAS_HANDLER_UIDS no instance (or profile
        run) here holds. An OSError when every one is held."""
        if self.handler_user is None:
            return os.geteuid()
        if self.uids is None:
            return self.handler_user.uid
        held = {r.uid for r in self.instances.values()} | self._lent_uids
        for uid in self.uids:
            if uid not in held:
                return uid
        raise OSError(f"all {len(self.uids)} uids of GFAAS_HANDLER_UIDS are in use here")

    def _assignment(
        self,
        cmd: StartInstance,
        cores: frozenset[int],
        directory: Path | None,
        uid: int | None = None,
    ) -> dict[str, str]:
        """The environment an instance runs with, beyond the agent's own."""
        env = settings_env(self.settings)
        # Handler code holds what its process connects with: the instances' identity,
        # not the worker's (shared/auth.py INSTANCE).
        env["GFAAS_NATS_CREDS"] = auth.instance_creds(self.settings)
        budget_mb = max(1, -(-cmd.memory_bytes // MB))
        env.update(
            {
                "GFAAS_WORKER_ID": cmd.instance_id,
                "GFAAS_DEVICE": self.device,
                "GFAAS_INSTANCE_FUNCTION": cmd.function,
                "GFAAS_INSTANCE_AGENT": self.agent_id,
                "GFAAS_INSTANCE_CORES": ",".join(str(c) for c in sorted(cores)),
                "GFAAS_THREADS": str(max(len(cores), 1)),
                "GFAAS_DEVICE_CACHE_MB": str(budget_mb),
                "GFAAS_AGENT_ENABLED": "false",
                "GFAAS_INSTANCE_GATED": "true" if cmd.gated else "false",
                # Each instance its own metrics port, any free one (its status says which).
                "GFAAS_METRICS_PORT": "0",
            }
        )
        if cmd.spec is not None:
            env["GFAAS_INSTANCE_SPEC"] = msgspec.json.encode(cmd.spec).decode()
        if directory is not None:
            # It switches to the handler user there (privileges.become); its working
            # directory changes, so the state directory must not be relative.
            env["GFAAS_INSTANCE_DIR"] = str(directory)
            env["GFAAS_STATE_DIR"] = str(self.settings.state_dir.resolve())
            if self.uids is not None and uid is not None:
                env["GFAAS_INSTANCE_UID"] = str(uid)
        if self.spatial.mode == "mps" and self.spatial.mps_dirs is not None:
            env.update(mps.client_env(cmd.sm_share, self.spatial.mps_dirs))
        if cmd.code and self.bundles is not None:
            # Extracted by `prepare`, root's and read-only: first on its import path.
            env["GFAAS_INSTANCE_CODE"] = cmd.code
            env["GFAAS_INSTANCE_CODE_DIR"] = str(self.bundles.directory(parse_ref(cmd.code)))
        return env

    # -- what the instances say -------------------------------------------------------

    def heard(self, instance_id: str) -> None:
        """An instance's heartbeat: the first makes it ready."""
        running = self.instances.get(instance_id)
        if running is not None and running.state is InstanceState.STARTING:
            running.state = InstanceState.READY
            running.ready_s = self.clock() - running.started
            log.info("instance.ready", instance=instance_id, ready_s=round(running.ready_s, 3))

    def failed(self, note: InstanceFailed) -> None:
        running = self.instances.get(note.instance_id)
        if running is None:
            return
        running.error = note.error
        log.warning(
            "instance.start_failed",
            instance=note.instance_id,
            function=running.command.function,
            code=note.error.code,
            reason=note.error.reason,
        )

    def fill_failed(self, instance_id: str, error: ErrorInfo) -> None:
        """The model of a starting instance could not be put into the host tier: the
        instance fails with that reason (its process, waiting for the model, goes)."""
        running = self.instances.get(instance_id)
        if running is None or running.state is not InstanceState.STARTING:
            return
        if running.process is None:
            self._fail(running, error)
            return
        self.failed(InstanceFailed(instance_id=instance_id, error=error))
        if running.process.poll() is None:
            limits.kill_instance(running.process)  # reaped: FAILED with this error

    def waiting(self, request: TokenAcquire) -> anyio.CancelScope:
        """Note a token request as it arrives, before its wait starts: a release
        that follows it (the instance gave up) must find it."""
        scope = anyio.CancelScope()
        self._waits[request.instance_id] = scope
        return scope

    async def acquire(self, request: TokenAcquire, scope: anyio.CancelScope) -> TokenGrant:
        name = request.instance_id
        try:
            if name not in self.runner.arbiter:
                reason = f"no instance {name} holds a share of {self.device} here"
                return TokenGrant(error=ErrorInfo(code=ErrorCode.NOT_FOUND, reason=reason))
            with scope:
                grant = await self.runner.acquire(name)
                return TokenGrant(slice_s=grant.slice_s)
        finally:
            if self._waits.get(name) is scope:
                del self._waits[name]
        reason = "the request was given up"
        return TokenGrant(error=ErrorInfo(code=ErrorCode.UNAVAILABLE, reason=reason))

    def release(self, note: TokenRelease) -> None:
        name = note.instance_id
        wait = self._waits.get(name)
        if wait is not None:  # still waiting: it gave up
            wait.cancel()
            return
        if name in self.runner.arbiter and name in self.runner.arbiter.holders():
            # NaN (or inf) is no time: the arbiter refuses to charge it, and the grant
            # would stay held, every other instance of the device waiting behind it.
            # What a release says is the instance's word anyway (0 is as easily said).
            used = note.used_s if math.isfinite(note.used_s) else 0.0
            self.runner.release(name, max(used, 0.0))

    # -- upkeep -----------------------------------------------------------------------

    def reap(self) -> bool:
        """Forget instances whose process ended; kill those past their stop grace.
        True when anything changed (the caller beats at once)."""
        now = self.clock()
        changed = False
        for name, running in list(self.instances.items()):
            process = running.process
            if running.state is InstanceState.FAILED:
                if now >= running.gone_at:
                    del self.instances[name]
                    changed = True
                continue
            if running.preparing and running.state is InstanceState.STARTING:
                continue  # no process yet: its bundle is on its way
            code = process.poll() if process is not None else 0
            if code is None:
                assert process is not None
                if running.state is InstanceState.STOPPING and now >= running.stop_at:
                    limits.kill_instance(process)
                elif (
                    running.state is InstanceState.STARTING
                    and now - running.started > self.settings.instance_start_timeout_s
                ):
                    self._start_timed_out(running, process)
                continue
            if process is not None:
                limits.kill_group(process.pid)
            self.runner.remove(name)
            changed = True
            self._remove_dir(running)
            if self.copies is not None:
                self.copies.release(name)  # its process, the last to map it, is gone
            if running.state is InstanceState.STOPPING:
                del self.instances[name]
                log.info("instance.stopped", instance=name)
            elif running.state is InstanceState.STARTING:
                running.state = InstanceState.FAILED
                running.gone_at = now + FAILED_KEPT_S
                if running.error is None:
                    # Lost, not refused by its function: the scheduler sends what it
                    # took (none of it ran) to another start.
                    running.error = ErrorInfo(
                        code=ErrorCode.WORKER_LOST,
                        reason=f"instance process exited with {code} before it was ready",
                    )
            else:
                self.crashed += 1
                del self.instances[name]
                log.error("instance.crashed", instance=name, exit_code=code)
        return changed

    def _start_timed_out(self, running: Running, process: subprocess.Popen[bytes]) -> None:
        """Killed; reaped as FAILED with this reason, which the function's waiting
        callers hear (its build is at fault, not a lost process: no retry)."""
        limit = self.settings.instance_start_timeout_s
        self.failed(
            InstanceFailed(
                instance_id=running.command.instance_id,
                error=ErrorInfo(
                    code=ErrorCode.HANDLER_ERROR,
                    reason=f"an instance of {running.command.function!r} was not ready "
                    f"within {limit:g} s of its start (its handler's build or its model's "
                    "load did not return)",
                ),
            )
        )
        limits.kill_instance(process)

    @staticmethod
    def _remove_dir(running: Running) -> None:
        """Its directory goes with its process (whatever its handler left there)."""
        if running.directory is not None:
            InstanceDirs.remove(running.directory)
            running.directory = None

    def beat(self) -> AgentBeat:
        return AgentBeat(
            agent_id=self.agent_id,
            node=self.settings.node,
            device=self.device,
            memory_total=self.memory_total,
            cores=len(self.cores),
            spatial=self.spatial.mode,
            instances=[r.info() for r in self.instances.values()],
            sent_at=now_millis() / 1000.0,
            shares_weights=self.shares_weights,
            isolated=self.isolated,
            host_models=sorted(self.host_models()),
        )

    def details(self) -> dict[str, object]:
        return {
            "agent_id": self.agent_id,
            "spatial": self.spatial.mode,
            "memory_total": self.memory_total,
            "memory_used": self.memory_used(),
            "shares_weights": self.shares_weights,
            "weights": self.weights(),
            # The device copies held here (CUDA): bytes, copies and holders per model.
            "device_copies": self.copies.report() if self.copies is not None else {},
            "started": self.started,
            "crashed": self.crashed,
            "spares": len(self.spares.procs),
            "started_from_spares": self.spares.taken,
            # Who instances run as: None when as this agent's own user.
            "handler_user": self.handler_user.as_dict() if self.handler_user else None,
            # Why the default (auto: nobody) left them as this agent's user, if it did.
            "handler_user_off": access.auto_off(),
            "isolated": self.isolated,
            "instances": [{**msg_dict(r.info()), "uid": r.uid} for r in self.instances.values()],
        }

    def keep_spares(self, wanted: bool) -> None:
        """Spares while instances are wanted here; refilled only while no instance is
        starting (a spare's imports would slow that start down)."""
        starting = any(r.state is InstanceState.STARTING for r in self.instances.values())
        if not wanted or not starting:
            self.spares.keep(wanted)

    async def shutdown(self) -> None:
        await anyio.to_thread.run_sync(self.spares.close)
        for running in self.instances.values():
            self._terminate(running)
        with anyio.move_on_after(STOP_GRACE_S):
            while any(
                r.process is not None and r.process.poll() is None for r in self.instances.values()
            ):
                await anyio.sleep(0.05)
        for running in self.instances.values():
            if running.process is not None:
                if running.process.poll() is None:
                    limits.kill_instance(running.process)
                    running.process.wait()
                limits.kill_group(running.process.pid)
            self._remove_dir(running)
        self.instances.clear()
        if self.copies is not None:
            await anyio.to_thread.run_sync(self.copies.release_all)
        if self.dirs is not None:
            self.dirs.close()
        if self.spatial.started_daemon and self.spatial.mps_dirs is not None:
            await anyio.to_thread.run_sync(mps.stop_daemon, self.spatial.mps_dirs)


def msg_dict(msg: InstanceInfo) -> dict[str, object]:
    import msgspec

    out: dict[str, object] = msgspec.to_builtins(msg)
    return out


@dataclass
class AgentService:
    """The agent on the bus: commands, token requests, beats and reaping."""

    nc: NATS
    agent: Agent
    heartbeat_s: float
    # Are instances wanted on this node (some deployed function runs as instances)?
    wanted: Callable[[], bool] = lambda: False
    # Puts a model into the node's host tier, as this process's user: on an isolated
    # node, for each instance of a model as it starts (`_fill`).
    fill: Callable[[str], Awaitable[object]] | None = None
    # The node's host-tier copy of a model (filled if need be): what a device copy
    # that instances share is made from.
    host: Callable[[str], Awaitable[HostModel]] | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        agent = self.agent
        async with anyio.create_task_group() as tg:

            async def on_op(msg: Msg) -> None:
                op = subjects.last_token(msg.subject)
                try:
                    if op == "acquire":
                        request = decode(msg.data, TokenAcquire)
                        tg.start_soon(self._acquire, msg, request, agent.waiting(request))
                    elif op == "release":
                        agent.release(decode(msg.data, TokenRelease))
                    elif op == "start":
                        command = decode(msg.data, StartInstance)
                        reply = agent.start(command)
                        await msg.respond(encode(reply))
                        if reply.error is None and command.code:
                            tg.start_soon(agent.prepare, command.instance_id)
                        if reply.error is None and command.model and agent.isolated:
                            tg.start_soon(self._fill, command)
                        await self.beat()
                    elif op == "stop":
                        reply = agent.stop(decode(msg.data, StopInstance))
                        await msg.respond(encode(reply))
                    elif op == "failed":
                        agent.failed(decode(msg.data, InstanceFailed))
                    elif op == "weights":
                        # A copy may take a while (the host tier first): its own task.
                        tg.start_soon(
                            device_weights.answer,
                            msg,
                            agent.copies,
                            agent.model_of,
                            self._host_model,
                            agent.device,
                        )
                except Exception as exc:  # a bad message costs its answer, not the agent
                    log.warning("agent.bad_message", op=op, error=described(exc))
                    if msg.reply:
                        error = ErrorInfo(code=ErrorCode.BAD_REQUEST, reason=described(exc))
                        await msg.respond(encode(AgentReply(error=error)))

            async def on_heartbeat(msg: Msg) -> None:
                running = agent.instances.get(subjects.last_token(msg.subject))
                if running is None or running.state is not InstanceState.STARTING:
                    return
                # An instance still loading beats too (it takes the invocations that
                # wait for it): only a beat that says it has loaded makes it ready.
                try:
                    starting = decode(msg.data, WorkerHeartbeat).starting
                except Exception:  # not a heartbeat: it says nothing of readiness
                    return
                if not starting:
                    agent.heard(running.command.instance_id)

            ops = await self.nc.subscribe(subjects.agent_all(agent.agent_id), cb=on_op)
            beats = await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=on_heartbeat)
            await self.beat()
            task_status.started()
            try:
                elapsed = 0.0
                while True:
                    await anyio.sleep(0.05)
                    elapsed += 0.05
                    changed = agent.reap()
                    if changed or elapsed >= self.heartbeat_s:
                        elapsed = 0.0
                        agent.keep_spares(self.wanted())
                        await self.beat()
            finally:
                with anyio.CancelScope(shield=True):
                    await ops.unsubscribe()
                    await beats.unsubscribe()
                    await agent.shutdown()
                    await self.beat()

    async def _host_model(self, model: str) -> HostModel:
        if self.host is None:
            raise GfaasError(ErrorCode.INTERNAL, "this agent has no host tier to copy from")
        return await self.host(model)

    async def _fill(self, command: StartInstance) -> None:
        """An isolated node's instance only maps the host tier (a segment it wrote, any
        handler of its user could write into): the agent puts the instance's model
        there as root, while the instance starts, and the instance waits for it
        (ModelStore.fill_host_tier). A fill that fails fails the start, with why."""
        if self.fill is None:
            return
        try:
            await self.fill(command.model)
        except Exception as exc:
            error = exc.info() if isinstance(exc, GfaasError) else None
            reason = (
                f"model {command.model!r} could not be put into the host tier: {described(exc)}"
            )
            error = error or ErrorInfo(code=ErrorCode.MODEL_UNAVAILABLE, reason=reason)
            self.agent.fill_failed(command.instance_id, error)
            await self.beat()

    async def _acquire(self, msg: Msg, request: TokenAcquire, scope: anyio.CancelScope) -> None:
        try:
            grant = await self.agent.acquire(request, scope)
        except Exception as exc:
            grant = TokenGrant(error=ErrorInfo(code=ErrorCode.BAD_REQUEST, reason=described(exc)))
        await msg.respond(encode(grant))

    async def beat(self) -> None:
        await self.nc.publish(subjects.agent_beat(self.agent.agent_id), encode(self.agent.beat()))
