"""System shared-memory regions that HTTP clients register (OIP shared-memory extension).

A client creates a POSIX shared-memory object, registers it once by key, then names
region + offset + size in each request instead of sending bytes. Ingress maps each
region once. Inputs are copied from the region into a pooled buffer (one memcpy on
the node, never through the bus) and reach the worker by handle; outputs come back
by handle and are copied into the client's region.

CUDA regions (services/ingress/cuda_regions.py) live in `ShmRegions.cuda`: the
extensions give both kinds one namespace, and `device`, `copy_in` and `copy_out`
serve a reference from whichever kind holds its name.

Region names belong to a tenant (issue 10): the fronts and the staging reach the
regions only through `ShmRegions.of(tenant)`, which files every name under the
caller's authenticated tenant, so a tenant can neither name, list nor unregister
another's region, and two tenants may each have a region "input".
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import msgspec
import numpy as np

from services.ingress.cuda_regions import CudaRegions
from services.ingress.oip import ShmRef
from services.ingress.oip_shm import CudaRegionStatus, RegionStatus
from shared.dataplane.backend import BackendError
from shared.dataplane.client import read_bytes, write_bytes
from shared.dataplane.shm import Segment, is_platform_segment, open_segment
from shared.errors import GfaasError, bad_request
from shared.schema import Handle


@dataclass
class _Region:
    key: str
    offset: int
    byte_size: int
    segment: Segment


class ShmRegions:
    def __init__(self, *, namespace: str = "gfaas", owners: Collection[int] | None = None) -> None:
        """`namespace`: the platform's shared-memory namespace, whose segments (pool
        slabs, lease board, model tier) no client may register; `owners`: the uids a
        registered segment may belong to (None: this process's own)."""
        self.namespace = namespace
        self.owners = frozenset([os.geteuid()] if owners is None else owners)
        self._regions: dict[str, _Region] = {}
        self.cuda = CudaRegions(taken=self._regions.__contains__)

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self._regions or name in self.cuda:
            raise bad_request(f"shared-memory region {name!r} is already registered")
        segment_name = key.removeprefix("/")
        if is_platform_segment(segment_name, self.namespace):
            raise bad_request(
                f"shared-memory key {key!r} is one of gfaas's own segments (pool slabs, "
                "lease board, model tier): register a region you created"
            )
        try:
            # Never through a symlink, only a regular file (shm.open_segment).
            segment = open_segment(segment_name)
        except BackendError as exc:
            raise bad_request(f"cannot open shared-memory key {key!r}: {exc}") from None
        if segment.uid not in self.owners:
            segment.close()
            raise bad_request(
                f"shared-memory key {key!r} belongs to uid {segment.uid}, not to one this "
                f"ingress serves ({', '.join(map(str, sorted(self.owners)))})"
            )
        if offset + byte_size > segment.size:
            segment.close()
            raise bad_request(
                f"region {name!r}: bytes [{offset}, {offset + byte_size}) are outside "
                f"{key!r} of {segment.size} bytes"
            )
        self._regions[name] = _Region(key, offset, byte_size, segment)

    def unregister(self, name: str | None = None) -> None:
        """One region, or every region when `name` is None (unknown names are fine)."""
        names = list(self._regions) if name is None else [name]
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                region.segment.close()

    def status(self, name: str | None = None) -> list[RegionStatus]:
        if name is not None and name not in self._regions:
            raise bad_request(f"no shared-memory region {name!r} is registered")
        return [
            RegionStatus(name=n, key=r.key, offset=r.offset, byte_size=r.byte_size)
            for n, r in sorted(self._regions.items())
            if name is None or n == name
        ]

    def view(self, ref: ShmRef, nbytes: int) -> memoryview:
        """`nbytes` of the region at the reference's offset, bounds-checked."""
        region = self._regions.get(ref.region)
        if region is None:
            raise bad_request(f"no shared-memory region {ref.region!r} is registered")
        if nbytes > ref.byte_size or ref.offset + nbytes > region.byte_size:
            raise bad_request(
                f"region {ref.region!r}: {nbytes} bytes at offset {ref.offset} do not fit "
                f"(shared_memory_byte_size {ref.byte_size}, region {region.byte_size} bytes)"
            )
        start = region.offset + ref.offset
        return memoryview(region.segment.mm)[start : start + nbytes]

    # -- either kind, by the name a request gives -----------------------------------------

    def device(self, ref: ShmRef) -> str:
        """The pool device to stage the region's bytes on: host memory for a system
        region, the region's GPU for a CUDA one (so that copy stays on the device)."""
        return "cpu" if ref.region in self._regions else self.cuda.device(ref)

    def copy_in(self, ref: ShmRef, handle: Handle) -> None:
        """The bytes the reference names into a leased buffer of `handle.nbytes`."""
        if ref.region in self._regions:
            write_bytes(handle, self.view(ref, handle.nbytes))
        else:
            self.cuda.copy_in(ref, handle)

    def copy_out(self, handle: Handle, ref: ShmRef) -> None:
        """A leased buffer's bytes into the region the reference names."""
        if ref.region in self._regions:
            target = self.view(ref, handle.nbytes)
            np.frombuffer(target, np.uint8)[:] = read_bytes(handle)
        else:
            self.cuda.copy_out(handle, ref)

    def of(self, tenant: str) -> TenantRegions:
        """The regions as `tenant` sees them: its own, by the names it gave."""
        return TenantRegions(self, tenant)

    def close(self) -> None:
        self.unregister()
        self.cuda.close()


class TenantRegions:
    """One tenant's view of an ingress's regions: names are filed as "tenant/name"
    underneath (a tenant name has no "/"), and only the tenant's are ever listed,
    looked up or unregistered."""

    def __init__(self, regions: ShmRegions, tenant: str) -> None:
        self._regions = regions
        self._prefix = f"{tenant}/"
        self.cuda = _TenantCuda(regions.cuda, self._prefix)

    def _ref(self, ref: ShmRef) -> ShmRef:
        return replace(ref, region=self._prefix + ref.region)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        with _named(self._prefix):
            self._regions.register(self._prefix + name, key, offset, byte_size)

    def unregister(self, name: str | None = None) -> None:
        if name is not None:
            with _named(self._prefix):
                self._regions.unregister(self._prefix + name)
            return
        for region in self.status():
            with _named(self._prefix):
                self._regions.unregister(self._prefix + region.name)

    def status(self, name: str | None = None) -> list[RegionStatus]:
        if name is not None and self._prefix + name not in self._regions:
            raise bad_request(f"no shared-memory region {name!r} is registered")
        return [
            msgspec.structs.replace(r, name=r.name.removeprefix(self._prefix))
            for r in self._regions.status()
            if r.name.startswith(self._prefix) and (name is None or r.name == self._prefix + name)
        ]

    def device(self, ref: ShmRef) -> str:
        with _named(self._prefix):
            return self._regions.device(self._ref(ref))

    def copy_in(self, ref: ShmRef, handle: Handle) -> None:
        with _named(self._prefix):
            self._regions.copy_in(self._ref(ref), handle)

    def copy_out(self, handle: Handle, ref: ShmRef) -> None:
        with _named(self._prefix):
            self._regions.copy_out(handle, self._ref(ref))


class _TenantCuda:
    """A tenant's CUDA regions (see TenantRegions)."""

    def __init__(self, cuda: CudaRegions, prefix: str) -> None:
        self._cuda = cuda
        self._prefix = prefix

    def available(self) -> bool:
        return self._cuda.available()

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        with _named(self._prefix):
            self._cuda.register(self._prefix + name, raw_handle, device_id, byte_size)

    def unregister(self, name: str | None = None) -> None:
        if name is not None:
            with _named(self._prefix):
                self._cuda.unregister(self._prefix + name)
            return
        for region in self.status():
            with _named(self._prefix):
                self._cuda.unregister(self._prefix + region.name)

    def status(self, name: str | None = None) -> list[CudaRegionStatus]:
        if name is not None and self._prefix + name not in self._cuda:
            raise bad_request(f"no CUDA shared-memory region {name!r} is registered")
        return [
            msgspec.structs.replace(r, name=r.name.removeprefix(self._prefix))
            for r in self._cuda.status()
            if r.name.startswith(self._prefix) and (name is None or r.name == self._prefix + name)
        ]


@contextmanager
def _named(prefix: str) -> Iterator[None]:
    """Errors name a region as its tenant gave it, not as it is filed."""
    try:
        yield
    except GfaasError as exc:
        raise GfaasError(exc.code, exc.reason.replace(f"'{prefix}", "'")) from None
