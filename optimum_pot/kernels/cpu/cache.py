"""Trust rules of the kernel cache: a cached library is loaded only when it is provably the one we built.

Loading a shared library runs its code (constructors, operator registration), so a file in the cache is checked
before ``dlopen``: the directory must be ours and private (owned by the current user, not writable by group or
others), the library and its build record regular files with the same properties, and the library's SHA-256 equal
to the digest recorded when it was built. Anything else (a planted, corrupt, empty or foreign file) is rebuilt; a
directory that is not private is refused (we do not change the permissions of a user's directory).
"""

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (concurrent first builds then both build; still safe)
    fcntl = None


class CacheTrustError(RuntimeError):
    """The cache directory cannot be trusted (the message says why and how to fix it)."""


def _owner_problem(st: os.stat_result) -> str | None:
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):#o})"
    return None


def private_dir(path: Path) -> Path:
    """Creates ``path`` (mode 0700) if needed and returns it; raises :class:`CacheTrustError` unless it is a
    directory owned by the current user and not writable by group or others."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as err:
        raise CacheTrustError(f"cannot create the kernel cache {path}: {err}; set $OPTIMUM_POT_CACHE to a "
                              "writable private directory") from err  # fmt: skip
    problem = "not a directory" if not stat.S_ISDIR(st.st_mode) else _owner_problem(st)
    if problem:
        raise CacheTrustError(
            f"refusing the kernel cache {path}: it is {problem}; run `chmod go-w {path}` if it is yours, or set "
            "$OPTIMUM_POT_CACHE to a private directory"
        )
    return path


def record_path(library: Path) -> Path:
    """The build record (JSON: digest, key, compiler, flags) next to ``library``."""
    return library.with_suffix(".json")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_problem(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a link or a device)"
    if st.st_size == 0:
        return "empty"
    return _owner_problem(st)


def untrusted_reason(library: Path, key: str) -> str | None:
    """Why ``library`` must not be loaded, or ``None`` when it is ours (checked before any ``dlopen``)."""
    problem = _file_problem(library)
    if problem:
        return f"the library is {problem}"
    record = record_path(library)
    problem = _file_problem(record)
    if problem:
        return f"its build record {record.name} is {problem} (a file this process did not build)"
    try:
        meta = json.loads(record.read_text())
        expected, built_key = meta["sha256"], meta["key"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its build record is unreadable ({err})"
    if built_key != key:
        return "its build record is for other sources or flags"
    if file_digest(library) != expected:
        return "its SHA-256 differs from the digest recorded at build time (corrupt or replaced)"
    return None


def write_record(library: Path, meta: dict) -> None:
    """Records ``library``'s digest (and ``meta``) atomically, readable and writable by the owner only."""
    data = json.dumps({**meta, "sha256": file_digest(library)}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=".record-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, record_path(library))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def locked(directory: Path):
    """Exclusive lock on ``directory`` across processes (test workers building at once build once)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
