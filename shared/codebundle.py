"""Code bundles: handler code the admin uploaded, pinned by digest in a spec.

A spec's `code = "NAME@sha256:<hex>"` names a bundle that `gfaas code push NAME DIR`
stored (shared/codestore.py): a zip of the Python packages and modules under DIR,
packed so that the same files always give the same bytes (`pack`: sorted entries,
fixed timestamps and modes, regular files only, no `__pycache__` or `.pyc`, no
hidden entries), so the digest names the code itself. Its handler's module must be
in one of the bundle's top-level packages (`packages_of`), or in the node's
handler packages as for any spec.

A node extracts a bundle once per digest (`extract`): the bytes are hashed first (a
bundle replaced in the store is refused before anything is written), every entry is
checked before one is written (no absolute path, no `..`, no link or device, no
duplicate, under the caps of `Limits`), then the files are written into a fresh
directory beside the final one and renamed into place only when complete: a
refused or failed bundle leaves nothing behind, and a directory named by a digest
holds exactly that bundle. Directories 0755, files 0644: the handler user reads it,
only the node's own user writes it. Nothing here talks to NATS.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from shared.names import is_valid_name, name_problem

REF_RE: Final = re.compile(r"^(?P<name>[^@]*)@sha256:(?P<digest>[0-9a-f]{64})\Z")
# Every entry is stamped with this (zip's epoch): the bytes depend on the files only.
ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
DIR_MODE: Final = 0o755
FILE_MODE: Final = 0o644
# Names no bundle's top-level package may have: they would shadow what the instance
# itself imports (gfaas, the standard library) for the rest of that process.
RESERVED: Final = frozenset({"shared", "services", "gfaas", *sys.stdlib_module_names})
_SKIPPED_DIRS: Final = frozenset({"__pycache__"})
_SKIPPED_SUFFIXES: Final = (".pyc", ".pyo")
_COPY_CHUNK: Final = 1024 * 1024


class BundleError(ValueError):
    """A bundle (or a reference to one) that cannot be used; the message says why."""


@dataclass(frozen=True)
class BundleRef:
    """`name@sha256:<digest>`: a bundle's name and the SHA-256 (hex) of its bytes."""

    name: str
    digest: str

    def __str__(self) -> str:
        return f"{self.name}@sha256:{self.digest}"

    @property
    def short(self) -> str:
        return f"{self.name}@sha256:{self.digest[:12]}…"


@dataclass(frozen=True)
class Limits:
    """What one bundle may hold: bytes in all (uncompressed), files, bytes per file."""

    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 4096
    max_entry_bytes: int = 32 * 1024 * 1024

    @property
    def max_stored_bytes(self) -> int:
        """The largest zip of such contents (stored files plus per-entry headers)."""
        return self.max_bytes + self.max_files * 512 + 64 * 1024


def ref_problem(text: str) -> str | None:
    """Why `text` is no bundle reference, or None."""
    found = REF_RE.fullmatch(text)
    if found is None:
        return (
            f"code {text!r} must be NAME@sha256:<64 lowercase hex digits> "
            "(what `gfaas code push NAME DIR` prints)"
        )
    if not is_valid_name(found["name"]):
        return name_problem("code bundle", found["name"])
    return None


def parse_ref(text: str) -> BundleRef:
    problem = ref_problem(text)
    if problem is not None:
        raise BundleError(problem)
    found = REF_RE.fullmatch(text)
    assert found is not None
    return BundleRef(found["name"], found["digest"])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_package_name(name: str) -> bool:
    # Dunders are the interpreter's; the same rule as shared.function's allow-list.
    return name.isidentifier() and not name.startswith("__")


def packages_of(names: Iterable[str]) -> tuple[str, ...]:
    """The top-level packages and modules of a bundle with these file names
    (`pkg/mod.py` gives `pkg`, `mod.py` gives `mod`), sorted."""
    found: set[str] = set()
    for name in names:
        if not name.endswith(".py"):
            continue
        top, slash, _ = name.partition("/")
        top = top if slash else top.removesuffix(".py")
        if _is_package_name(top):
            found.add(top)
    return tuple(sorted(found))


def _check_packages(packages: tuple[str, ...], where: str) -> None:
    if not packages:
        raise BundleError(f"{where} holds no Python package or module")
    shadowing = sorted(set(packages) & RESERVED)
    if shadowing:
        raise BundleError(
            f"{where}: package(s) {', '.join(shadowing)} would shadow gfaas's own or the "
            "standard library's modules in the instance; rename them"
        )


# -- packing (the admin's side) -------------------------------------------------------------


def bundle_files(directory: Path) -> list[tuple[str, Path]]:
    """(entry name, file) for everything `pack` puts in a bundle of `directory`, sorted."""
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a directory")
    out: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(directory):
        # Pruned in place: hidden directories (.git, .venv) and bytecode caches.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS)
        base = Path(root)
        for d in dirs:
            if (base / d).is_symlink():
                raise BundleError(f"{base / d} is a symlink: a bundle holds regular files only")
        for f in sorted(files):
            if f.startswith(".") or f.endswith(_SKIPPED_SUFFIXES):
                continue
            path = base / f
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise BundleError(f"{path} is {kind}: a bundle holds regular files only")
            out.append((path.relative_to(directory).as_posix(), path))
    return sorted(out)


def pack(directory: Path, limits: Limits = Limits()) -> bytes:
    """`directory`'s Python packages and modules as a deterministic zip."""
    files = bundle_files(directory)
    _check_packages(packages_of(n for n, _ in files), str(directory))
    if len(files) > limits.max_files:
        raise BundleError(f"{directory}: {len(files)} files, more than {limits.max_files}")
    total = 0
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, path in files:
            data = path.read_bytes()
            if len(data) > limits.max_entry_bytes:
                raise BundleError(f"{path}: {len(data)} bytes, over {limits.max_entry_bytes}")
            total += len(data)
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.create_system = 3  # unix: the mode below is read as one
            info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=6)
    if total > limits.max_bytes:
        raise BundleError(f"{directory}: {total} bytes in all, over {limits.max_bytes}")
    return buffer.getvalue()


# -- checking and extracting (the node's side) ---------------------------------------------


def check_entries(zf: zipfile.ZipFile, limits: Limits, where: str) -> list[zipfile.ZipInfo]:
    """The bundle's file entries, every entry checked first: a BundleError names the
    first that could write outside the directory, is no regular file or directory,
    or is over a cap."""
    files: list[zipfile.ZipInfo] = []
    seen: set[str] = set()
    total = 0
    for info in zf.infolist():
        name = info.filename
        parts = name.removesuffix("/").split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise BundleError(f"{where}: entry {name!r} is not a plain relative path")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            what = "a symlink" if kind == stat.S_IFLNK else "not a regular file"
            raise BundleError(f"{where}: entry {name!r} is {what}")
        if info.flag_bits & 0x1:
            raise BundleError(f"{where}: entry {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError(f"{where}: entry {name!r} uses an unsupported compression")
        if name.rstrip("/") in seen:
            raise BundleError(f"{where}: entry {name!r} appears twice")
        seen.add(name.rstrip("/"))
        if info.is_dir() or kind == stat.S_IFDIR:
            continue
        if info.file_size > limits.max_entry_bytes:
            raise BundleError(
                f"{where}: entry {name!r} holds {info.file_size} bytes, over the cap of "
                f"{limits.max_entry_bytes}"
            )
        total += info.file_size
        files.append(info)
    if len(files) > limits.max_files:
        raise BundleError(f"{where}: {len(files)} files, over the cap of {limits.max_files}")
    if total > limits.max_bytes:
        raise BundleError(
            f"{where}: {total} bytes uncompressed, over the cap of {limits.max_bytes} "
            "(GFAAS_CODE_BUNDLE_MAX_MB)"
        )
    _check_packages(packages_of(i.filename for i in files), where)
    return files


def extract(data: bytes, ref: BundleRef, root: Path, limits: Limits = Limits()) -> Path:
    """`root/<digest>` holding the bundle `data` is (extracted now, or already there);
    a BundleError when its bytes are not the ones `ref` pins or it is unsafe."""
    got = sha256_hex(data)
    if got != ref.digest:
        raise BundleError(
            f"code bundle {ref} is corrupt or was replaced in the code store: its bytes "
            f"hash to sha256:{got[:12]}…, not the digest the spec pins; push it again"
        )
    final = root / ref.digest
    if final.is_dir():
        return final
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"code bundle {ref.short} is not a zip: {exc}") from None
    with zf:
        files = check_entries(zf, limits, f"code bundle {ref.short}")
        make_dir(root)
        partial = Path(tempfile.mkdtemp(prefix=f".{ref.digest[:16]}-", dir=root))
        try:
            for info in files:
                _write(zf, info, partial)
            _seal(partial)
            try:
                os.rename(partial, final)
            except OSError:
                if not final.is_dir():  # not another agent's extraction winning the race
                    raise
                shutil.rmtree(partial, ignore_errors=True)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(exc, OSError | zipfile.BadZipFile):
                raise BundleError(f"code bundle {ref.short} cannot be extracted: {exc}") from exc
            raise
    return final


def make_dir(path: Path) -> None:
    """`path` (and its parents) made, 0755: the handler user passes and lists them."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def _write(zf: zipfile.ZipFile, info: zipfile.ZipInfo, into: Path) -> None:
    """One checked entry, into a directory only this process has written."""
    target = into.joinpath(*info.filename.split("/"))
    for parent in reversed(target.relative_to(into).parents[:-1]):
        directory = into / parent
        if not directory.is_dir():
            os.mkdir(directory, DIR_MODE)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    # zipfile reads no more than the entry declares (what the caps were checked on),
    # and raises BadZipFile when those bytes do not match its CRC.
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        shutil.copyfileobj(src, out, _COPY_CHUNK)


def _seal(directory: Path) -> None:
    """Modes as the handler user needs them, whatever this process's umask was."""
    for root, dirs, files in os.walk(directory):
        os.chmod(root, DIR_MODE)
        for d in dirs:
            os.chmod(os.path.join(root, d), DIR_MODE)
        for f in files:
            os.chmod(os.path.join(root, f), FILE_MODE)


def extracted_packages(directory: Path) -> tuple[str, ...]:
    """The top-level packages of a bundle extracted at `directory`."""
    names = [
        (Path(root) / f).relative_to(directory).as_posix()
        for root, _, files in os.walk(directory)
        for f in files
    ]
    return packages_of(names)
