"""Safe outputs: atomic replacement, outputs committed together, checks before any work, locks.

A crash leaves the old file or the complete new one, never half of one. Temp files carry the host and
pid of their writer (`.NAME.HOST-PID.HEX.tmp`), so the next run can remove those a killed process left.

What an output path may be (`target`): a new path or a regular file is replaced atomically (temp file,
rename); a symbolic link to a regular file replaces that file and keeps the link; `-` (standard output),
an existing FIFO or character device (a link to one, or a link the kernel resolves itself such as
/dev/stdout) is never renamed over: the output is written to a temp file and then copied into it, in
place. Which outputs may be streams is the command's choice (`check_paths(streams=...)`); a directory, a
socket or a block device is never an output file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile

try:
    import resource
except ImportError:  # not on Windows: no file size limit to read
    resource = None
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imet.errors import ImetError

_HOST = socket.gethostname().replace(".", "_").replace("-", "_")
STDOUT = "-"  # an output that goes to standard output
HDF5_METADATA = 1 << 20  # room an HDF5 file needs beyond its arrays' bytes (headers, B-trees, strings)
REPLACE, IN_PLACE = "replace", "in place"  # how an output is written (see `target`)
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}  # errors of writing, never of reading


def temp_name(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temp path next to `path` that names its writer (host and pid) for later clean-up."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(6)}.{kind}")


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temp files next to `path` left by dead processes of this host (kill -9); returns them."""
    path = Path(path)
    removed = []
    try:  # .NAME.HOST-PID.*, and ..NAME.HOST-PID.* (a temp file's own temp file, of a nested write)
        siblings = [(p, dots) for dots in (1, 2)
                    for p in path.parent.glob("." * dots + f"{glob_escape(path.name)}.{_HOST}-*.*")]
    except OSError:
        return removed
    for p, dots in siblings:
        pid = p.name[len(path.name) + len(_HOST) + 2 + dots:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # make a rename itself durable
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def target(path: str | os.PathLike) -> tuple[str, Path]:
    """How an output is written: (REPLACE, the file to rename over) for a new path, a regular file or a link
    to one (the file it names); (IN_PLACE, path) for `-`, an existing FIFO or character device, or a link to
    one. Anything else (a directory, a socket, a block device, a link loop) is refused."""
    path = Path(path)
    if str(path) == STDOUT:
        return IN_PLACE, path
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # a new file (or a dangling link: the file it names is created)
        return REPLACE, Path(os.path.realpath(path))
    except OSError as e:
        raise ImetError(f"{path}: cannot be written ({e.strerror})") from None
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return IN_PLACE, path
    if stat.S_ISREG(mode):
        real = Path(os.path.realpath(path))
        return (REPLACE, real) if real.is_file() and os.path.samefile(real, path) else (IN_PLACE, path)
    what = "directory" if stat.S_ISDIR(mode) else "socket" if stat.S_ISSOCK(mode) else "block device"
    raise ImetError(f"{path}: is a {what}; give a file path")


@contextmanager
def atomic_paths(*paths: str | os.PathLike | None) -> Iterator[list[Path | None]]:
    """Temp paths for several outputs; renamed into place together only after all were written (streams,
    see `target`, are copied into instead).

    None entries stay None (an output not asked for). On any error every temp file is removed and no
    output is touched; an error writing names the output, not its temp file.
    """
    targets = [None if p is None else target(p) for p in paths]
    tmps = []
    for t in targets:
        if t is not None:
            where = t[1] if t[0] == REPLACE else Path(tempfile.gettempdir()) / t[1].name
            clean_stale(where)
            tmps.append(temp_name(where))
        else:
            tmps.append(None)
    try:
        yield tmps
        for tmp in tmps:
            if tmp is not None:
                _fsync_file(tmp)
        for tmp, t in zip(tmps, targets, strict=True):
            if t is not None:
                os.replace(tmp, t[1]) if t[0] == REPLACE else _copy_into(tmp, t[1])
    except BaseException as e:
        for tmp in tmps:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        _name_outputs(e, [(tmp, p) for tmp, p in zip(tmps, paths, strict=True) if tmp is not None])
        raise
    finally:
        for tmp, t in zip(tmps, targets, strict=True):
            if t is not None and t[0] == IN_PLACE:
                tmp.unlink(missing_ok=True)
    for parent in {t[1].parent for t in targets if t is not None and t[0] == REPLACE}:
        _fsync_dir(parent)


def _copy_into(tmp: Path, path: Path) -> None:
    """Write a finished temp file's bytes into a stream output: standard output, a FIFO, a device."""
    with open(tmp, "rb") as src:
        if str(path) == STDOUT:
            sys.stdout.flush()
            shutil.copyfileobj(src, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        regular = stat.S_ISREG(os.stat(path).st_mode)  # e.g. /dev/stdout of a command redirected to a file
        fd = os.open(path, os.O_WRONLY | (os.O_APPEND if regular else 0))
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _name_outputs(e: BaseException, pairs: list[tuple[Path, str | os.PathLike]]) -> None:
    """Make an error raised while writing name the user's output, not its temp file (in place in `e`).

    An ImetError or OSError that names a temp file (or a file in a temp directory) names the output
    instead; an OSError of writing that names no file (a full disk, a file size limit, a read-only disk)
    becomes a one-line ImetError naming the outputs.
    """
    def named(text: str) -> str:
        for tmp, path in pairs:
            text = text.replace(str(tmp), str(path)).replace(tmp.name, Path(path).name)
        return text

    if isinstance(e, ImetError):
        e.args = (named(str(e)), *e.args[1:])
    elif isinstance(e, OSError) and e.filename is not None:
        e.filename = named(str(e.filename))
    elif isinstance(e, OSError) and e.errno in WRITE_ERRORS:
        raise ImetError(f"{', '.join(str(p) for _, p in pairs)}: cannot write ({os.strerror(e.errno)})") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`, else remove it."""
    with atomic_paths(path) as (tmp,):
        yield tmp


REPORT_MARK = "imet-output-dir"  # a file that marks a directory imet wrote whole (report, explain)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success swap it in for `path` in one step.

    An existing `path` must be empty or a directory this function wrote before (it holds REPORT_MARK),
    so no user file is ever removed. A failure or a kill leaves the old directory as it was.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = temp_name(path, "dir")
    tmp.mkdir()
    try:
        yield tmp
        (tmp / REPORT_MARK).write_text("written by imet; the whole directory is replaced on the next run\n")
        if path.exists():
            _exchange(tmp, path)  # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_outputs(e, [(tmp, path)])
        raise
    _fsync_dir(path.parent)


def check_replaceable(path: Path, name: str | None = None) -> None:
    """Refuse to replace a directory that holds files imet did not write there as a whole (`name`: the option
    that gave it, for the message, when a command's output check calls)."""
    if path.is_dir() and any(path.iterdir()) and not (path / REPORT_MARK).exists() and not _old_report(path):
        raise ImetError(f"{path}: {name + ' ' if name else ''}exists and holds files imet did not write; choose a new "
                        "or empty directory")


def _old_report(path: Path) -> bool:
    """A report directory written before REPORT_MARK existed: only its page, figures and overlay folders."""
    page = path / "index.html"
    try:
        ours = page.is_file() and "<title>imet report" in page.read_text(encoding="utf-8", errors="replace")[:400]
    except OSError:
        return False
    return ours and all(p.name == "index.html" or p.suffix == ".png" or (p.is_dir() and p.name.startswith("fig4_"))
                        for p in path.iterdir())


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE), else by two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None and fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return
    aside = temp_name(b, "old")
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def check_paths(inputs: dict[str, object], outputs: dict[str, object], dirs: tuple[str, ...] = (),
                replaced: tuple[str, ...] = (), streams: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, outputs that are an input or each other, or that cannot be written.

    `inputs` and `outputs` map an option name (for the message) to a path, a list of paths or None; an
    input directory stands for every file in it. Outputs named in `dirs` are directories (created by the
    command), the others files; those named in `replaced` are directories replaced whole, so no input may
    lie inside them; those named in `streams` may also be `-` (standard output), a FIFO or a character
    device, written in place (see `target`): any other output must be a regular file or a new path.
    """
    def items(d):
        for name, value in d.items():
            for p in value if isinstance(value, list | tuple) else [value]:
                if p is not None:
                    yield name, Path(p)

    ins, outs = list(items(inputs)), list(items(outputs))
    for k, (name, out) in enumerate(outs):
        for in_name, path in ins:
            if (_same(out, path) or (name in replaced and _inside(path, out))
                    or (_is_dir(path) and _inside(out, path))):
                raise ImetError(f"{out}: {name} would overwrite the input {in_name} {path}; choose another path")
        for other_name, other in outs[k + 1:]:
            if _same(out, other) and str(out) != STDOUT:
                raise ImetError(f"{out}: given as both {name} and {other_name}; choose two different paths")
            if str(out) == STDOUT == str(other):
                raise ImetError(f"-: standard output given as both {name} and {other_name}")
        writable(out, name, directory=name in dirs or name in replaced, stream=name in streams)
        if name in replaced:
            check_replaceable(out, name)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return folder.resolve() in path.resolve().parents
    except (OSError, RuntimeError):
        return False


def writable(path: Path, name: str, directory: bool = False, stream: bool = False) -> None:
    """Refuse an output whose directory is missing or unwritable, or that is of the wrong kind: a stream
    (`-`, a FIFO, a character device) where the command writes files only, a directory where it writes a
    file, or the reverse."""
    path = Path(path)
    if _is_dir(path) and not directory:
        raise ImetError(f"{path}: {name} is a directory; give a file path")
    if os.path.lexists(path) and directory and not _is_dir(path):
        raise ImetError(f"{path}: {name} exists and is not a directory")
    if not directory:
        how, real = target(path)
        if how == IN_PLACE:
            what = "standard output" if str(path) == STDOUT else "not a regular file (a FIFO or a device)"
            if not stream:
                raise ImetError(f"{path}: {name} is {what}; {name} is written to a temp file renamed over it, "
                                "so give a regular file path (only a submission can be written to - or a device)")
            if str(path) != STDOUT and not os.access(path, os.W_OK):
                raise ImetError(f"{path}: {name} is not writable")
            return
        path = real  # a link to a file: that file is replaced, the link kept
    parent = path.absolute().parent
    while directory and not parent.exists() and parent != parent.parent:
        parent = parent.parent  # an output directory is created with its parents
    if not parent.is_dir():
        raise ImetError(f"{path}: {name}: directory {parent} does not exist")
    probe = parent / f".imet-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:  # try it: permission bits do not tell for root, read-only mounts or full quotas
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise ImetError(f"{path}: {name}: cannot write in directory {parent} ({e.strerror})") from None
    if path.exists() and not os.access(path, os.W_OK) and not directory:
        raise ImetError(f"{path}: {name} exists and is read-only")


def check_free_space(path: Path, needed: int, new_file: bool = False) -> None:
    """Refuse to start a write of `needed` more bytes next to `path` that the disk, or the process's file size
    limit (`ulimit -f`) for a `new_file`, cannot hold. Every HDF5 write checks first: HDF5 that runs out of
    room mid-write can crash the process (seen: a segmentation fault on close) instead of raising."""
    needed += HDF5_METADATA
    free = shutil.disk_usage(Path(path).absolute().parent).free
    if needed > free:
        raise ImetError(f"{path}: needs {needed / 2**20:.1f} MiB more disk space, only {free / 2**20:.1f} MiB "
                        "free there; free some space or choose another path")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if new_file and limit != getattr(resource, "RLIM_INFINITY", -1) and needed > limit:
        raise ImetError(f"{path}: needs {needed / 2**20:.1f} MiB, more than this process may write to a file "
                        f"(ulimit -f: {limit} bytes); raise the limit")


@contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (through `.NAME.lock` next to it); a second holder gets an ImetError.

    The lock file is removed on release; a holder checks that the file it locked is still the one at the
    path (else it lost a race with that removal and tries again).
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 80, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ImetError(f"{path}: is being written by {holder}; wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the message of a second writer; the lock is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"imet pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (a DataLoader worker of a killed run)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read 1 MiB at a time (weights and model files are recorded by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
