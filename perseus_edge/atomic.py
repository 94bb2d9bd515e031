"""Writes that lose nothing: atomic files, atomic folder replace, one writer per output (torch-free).

    atomic_write(path, data)            temp file beside `path`, fsync, os.replace
    with atomic_folder(target) as tmp:  fill `tmp`; it becomes `target` when the block succeeds
    fault(point)                        test hook: PERSEUS_FAULT=point[:action] fails right here

A folder replace holds `.NAME.lock` (flock) beside the target for the whole write, so of two
concurrent writers exactly one proceeds and the other is told so. Replacing an existing folder
takes two renames (target -> .NAME.old-PID, then tmp -> target); a kill between them leaves the
previous folder as .NAME.old-PID, and the next writer of NAME puts it back before anything else.
Temp folders of killed runs (.NAME.tmp-*) are removed by that next writer: it holds the lock, so
no live process owns them. Every OSError of the write (disk full, read-only target, permission)
becomes one PerseusError line naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from perseus_edge.errors import PerseusError

FAULT_ENV = "PERSEUS_FAULT"
_ACTIONS = ("kill", "int", "enospc", "erofs", "eio")


_hits: dict[str, int] = {}


def fault(point: str, name: str | None = None) -> None:
    """Test hook: $PERSEUS_FAULT=`point[/name][@N][:action]` fails at the N-th pass (default 1st).

    Actions: kill (SIGKILL: a crash or kill -9), int (SIGINT: Ctrl-C), enospc (disk full), erofs
    (read-only file system), eio (I/O error). Default: kill. Costs one environment lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, action = spec.rpartition(":")
    if action not in _ACTIONS:
        where, action = spec, "kill"
    where, _, nth = where.partition("@")
    if where not in (point, f"{point}/{name}"):
        return
    _hits[where] = _hits.get(where, 0) + 1
    if _hits[where] != (int(nth) if nth.isdigit() else 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "int":
        os.kill(os.getpid(), signal.SIGINT)  # delivered here: the handler in place runs now
        return
    code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eio": errno.EIO}[action]
    raise OSError(code, os.strerror(code), name or point)


def describe_oserror(e: OSError) -> str:
    """'No space left on device' (+ the file name when there is one)."""
    why = e.strerror or str(e)
    return f"{why} ({e.filename})" if e.filename else why


# ----------------------------------------------------------------------------- files
def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part.

    Temp file in the same folder, fsync, os.replace, fsync of the folder. An OSError (disk full,
    read-only) propagates after the temp file is removed: the caller names what it was writing.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault("file.replace", path.name)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temp_files(folder: Path, pattern: str) -> None:
    """Remove `pattern` files named `...tmp-PID` whose process is gone (killed runs)."""
    for p in Path(folder).glob(pattern):
        pid = p.name.rpartition("tmp-")[2].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- folders
@contextlib.contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `target` (flock, released by the kernel if we die)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the renames still keep data safe
        yield
        return
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PerseusError(f"{target} is being written by another perseus process (pid {holder}): "
                               f"wait for it to finish") from None
        # the previous holder may have unlinked the file between our open and our flock
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def leftovers(target: Path, kind: str) -> list[Path]:
    """`.NAME.old-*` or `.NAME.tmp-*` entries beside `target`, oldest name first."""
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def recover(target: Path, log=None) -> None:
    """Undo what a killed writer of `target` left behind (call with the writer lock held).

    No `target` but a `.NAME.old-*` folder: the kill came between the two renames of a replace,
    so the previous folder goes back in place. Every other `.old-*` and `.tmp-*` is removed.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    olds = leftovers(target, "old")
    if olds and not os.path.lexists(target):
        os.rename(olds.pop(), target)
        log(f"note: restored {target} from an interrupted replace")
    for p in olds + leftovers(target, "tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def normalize(path: str | os.PathLike) -> Path:
    """Absolute path with `..` and symlinks of the parent resolved as the kernel does; the last
    component is kept (a symlink named as the target is replaced, not followed)."""
    p = Path(path).absolute()
    if p.name in ("", ".", ".."):
        return p.resolve()
    return p.parent.resolve() / p.name


def same_or_inside(a: str | os.PathLike, b: str | os.PathLike) -> tuple[bool, bool, bool]:
    """(a is b, a is inside b, b is inside a), with `..` and every symlink resolved."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb, rb in ra.parents, ra in rb.parents


def _nonempty(path: Path) -> bool:
    return not path.is_dir() or any(path.iterdir())


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; when the block succeeds it becomes `target`.

    Refuses an existing non-empty `target` unless `force`, and a `target` that is a file. On any
    failure (exception, Ctrl-C) the temp folder is removed and `target` is untouched.
    """
    target = normalize(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerseusError(f"cannot write to {target.parent}: {e.strerror}") from None
    try:
        with writer_lock(target):
            recover(target)
            if target.exists() and not target.is_dir():
                raise PerseusError(f"{target} exists and is not a folder")
            if target.exists() and not force and _nonempty(target):
                raise PerseusError(f"{target} already exists and is not empty (use --force to replace it)")
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
            old = None
            try:
                yield tmp
                fault("folder.written")
                fsync_dir(tmp)
                if target.exists():
                    old = target.with_name(f".{target.name}.old-{os.getpid()}")
                    os.rename(target, old)
                    fault("folder.swap")
                    os.rename(tmp, target)
                    fsync_dir(target.parent)
                    fault("folder.replaced")
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, target)
                    fsync_dir(target.parent)
            except BaseException:
                if old is not None and old.exists() and not os.path.lexists(target):
                    os.rename(old, target)  # interrupted between the renames: put it back now
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        raise PerseusError(f"cannot write {target}: {describe_oserror(e)}") from None
