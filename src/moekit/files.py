"""Files on disk, the same way for every verb: inputs read with a size bound, output paths checked before any work,
temporary directories that a later run recognises, atomic writes, directory swaps that survive a kill, and file
modes from the umask.

Naming: a temporary sibling of an output `OUT` is `.OUT.<tag>-<pid>-<hex>`; the previous version of `OUT` during a
swap is `.OUT.old-<pid>`. `clean_stale(OUT)` removes the temporaries of processes that are gone, and puts an old
version back when a kill fell between the two renames of a swap (so `OUT` is always whole: old or new).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from moekit.errors import MoekitError

MAX_DATA_BYTES = 1 << 30  # a data file (text or JSON lines) larger than this is refused, not read
MAX_JSON_BYTES = 64 << 20  # recipes, configs, manifests


class FileError(MoekitError, ValueError):
    """An input moekit cannot read, or an output path it cannot or must not write."""


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_bounded(path: str | os.PathLike, limit: int = MAX_DATA_BYTES, what: str = "file",
                 error: type[MoekitError] = FileError) -> bytes:
    """The bytes of the regular file `path`; refuses (with `error`) a device, FIFO, socket or directory (they are
    never opened: a FIFO would block) and a file of more than `limit` bytes."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e}); expected a readable {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{p}: is a {_kind(st.st_mode)}; expected a regular {what}")
    if st.st_size > limit:
        raise error(f"{p}: {st.st_size:,} bytes; expected a {what} of at most {limit:,} bytes")
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e}); expected a readable {what}") from None
    if len(raw) > limit:
        raise error(f"{p}: more than {limit:,} bytes; expected a {what} of at most {limit:,} bytes")
    return raw


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, flag: str = "--out",
                 directory: bool = True, error: type[MoekitError] = FileError) -> Path:
    """The resolved output path, checked before any work: not equal to, inside, or holding one of `inputs`;
    a directory (or absent) when `directory`, else not a directory; its parent a directory moekit may write in."""
    raw = out
    out = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if _within(out, src) or _within(src, out):
            where = "is" if out == src else "lies inside" if _within(out, src) else "contains"
            raise error(f"{flag} {raw}: {where} the input {item}; expected an output outside every input")
    if out.exists():
        if directory and not out.is_dir():
            raise error(f"{flag} {raw}: exists and is not a directory; expected a directory (or a new path)")
        if not directory and out.is_dir():
            raise error(f"{flag} {raw}: is a directory; expected a file path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag} {raw}: {parent} is not a directory; expected a path under a directory")
    for d in (parent, *([out] if out.is_dir() else [])):
        if not os.access(d, os.W_OK | os.X_OK):
            raise error(f"{flag} {raw}: cannot write in {d} (permission denied); expected a writable location")
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 1 << 22  # another user's process (an absurd number is no pid)
    return True


def _note(message: str) -> None:
    print(f"moekit: note: {message}", file=sys.stderr)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove what interrupted runs left beside `out` (temporaries of dead processes; an old version when `out`
    itself is whole) and put an old version back where a kill left no `out`. Says so on stderr; returns the paths
    removed or restored. Also recognises the names earlier moekit versions used. Safe to run from several
    processes at once (every rank of a torchrun job does)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    name = re.escape(out.name)
    new_tmp = re.compile(rf"^\.{name}\.[a-z]+-(\d+)-[0-9a-f]+$")
    old_tmp = re.compile(rf"^\.{name}(?:\.saving-|\.compress-|\.tmp|-)[A-Za-z0-9_]{{8}}$")
    old_version = re.compile(rf"^\.{name}(?:\.old-?|-old)(\d*)$")
    olds, done = [], []
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith("."):
            continue
        m = new_tmp.match(entry.name)
        if (m and not _pid_alive(int(m.group(1)))) or (not m and old_tmp.match(entry.name)):
            _remove(entry)
            _note(f"removed {entry} (a temporary directory left by an interrupted run)")
            done.append(entry)
            continue
        m = old_version.match(entry.name)
        if m and not (m.group(1) and _pid_alive(int(m.group(1)))):
            olds.append(entry)
    for entry in olds:
        if not out.exists() and entry.is_dir():
            try:
                entry.rename(out)
            except OSError:  # another process (an expert-parallel rank) restored it first
                continue
            _note(f"restored {out} from {entry.name} (a replacement was interrupted between its two renames)")
        else:
            _remove(entry)
            _note(f"removed {entry} (the previous version of {out.name}, left by an interrupted replacement)")
        done.append(entry)
    return done


def fix_modes(root: Path) -> None:
    """Modes from the umask for `root` and everything in it (mkdtemp, mkstemp and safetensors make them private)."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def new_temp_dir(out: Path, tag: str) -> Path:
    """An empty directory `.OUT.<tag>-<pid>-<hex>` beside `out` (mode from the umask)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.with_name(f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def temp_dir(out: str | os.PathLike, tag: str) -> Iterator[Path]:
    """A temporary sibling of `out` to build it in; removed on the way out unless it was swapped into place (on an
    exception or interrupt it is always removed)."""
    tmp = new_temp_dir(Path(out), tag)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """SIGINT / SIGTERM that arrive inside the block take effect when it ends (in the main thread; elsewhere the
    block runs as it is), so a swap is never cut between its renames and the removal of the old version."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in handlers:
        signal.signal(s, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if pending:
            signum, frame = pending[0]
            handler = handlers[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def swap_in(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` in place of `final` (absent or an earlier version) by two renames; after a
    kill at any point `clean_stale(final)` finds `final` whole (old or new) or puts the old version back. Ctrl-C and
    SIGTERM wait for the swap to finish (`deferred_interrupts`), so they never leave the old version beside it."""
    fix_modes(tmp)
    clean_stale(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    with deferred_interrupts():
        if old.exists():
            _remove(old)
        moved = False
        if final.exists():
            final.rename(old)
            moved = True
        try:
            tmp.rename(final)
        except BaseException:
            if moved and not final.exists():
                old.rename(final)
            raise
        if moved:
            _remove(old)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename (mode from the umask);
    temporaries a killed writer left beside `path` are removed first."""
    path = Path(path)
    clean_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
