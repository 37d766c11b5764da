"""One way to write a file and one way to hash one, for every module that writes or verifies.

`atomic_write` is the only write path for files the app owns: a temporary file in the target's folder,
fsync, rename. A reader sees the old file or the new one, never half of either, and a full disk leaves
the old file in place with an error that says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from p2p_local.errors import P2PError, StoreError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (base models are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def quoted(path: str | Path, into: str = "shell") -> str:
    """A path (or any text) as written into a generated file, the one rule for all of them: a shell line
    (the hook, a README's commands) gets it single-quoted; a Modelfile line takes it as it is, and a path
    holding a line break or another control character is refused there (a Modelfile cannot carry one, and it
    would begin a directive of its own)."""
    import shlex

    text = str(path)
    if into == "shell":
        return shlex.quote(text)
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in text):
        from p2p_local.errors import UsageError

        raise UsageError(f"the path {text!r} holds a line break or control character: a Modelfile cannot carry it",
                         hint="export to a folder whose path has none (--to DIR)")
    return text


def disk_error(e: OSError, path: Path, need: int | None = None) -> StoreError:
    """An OSError from a write, said plainly: a full disk names the path and the space needed."""
    if e.errno == errno.ENOSPC:
        more = f" ({need:,} bytes needed)" if need else ""
        return StoreError(f"disk full: cannot write {path}{more}", hint="free some space and try again; nothing was changed")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write {path}: {e.strerror}", hint="choose a writable location or fix its permissions")
    if e.errno == errno.EISDIR or (path.exists() and path.is_dir()):
        return StoreError(f"cannot write {path}: it is a directory", hint="give a file path, not a folder")
    return StoreError(f"cannot write {path}: {e.strerror or e}", hint="check the path and try again")


def refuse_special(path: str | Path, error: type[P2PError] = StoreError) -> None:
    """Raise `error` when `path` is a device, FIFO or socket (or a symlink to one): a write renames a
    regular file over it, which would replace `/dev/null` (as root) or a FIFO someone reads with the
    user's data. A missing path, a regular file (or a link to one) and a folder pass (a folder is
    said by the write itself)."""
    try:
        st = os.stat(path)  # follows symlinks: what a link points at is what would be lost
    except OSError:
        return  # missing (or unreadable): the write says what is wrong
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
    via = " (through a symbolic link)" if os.path.islink(path) else ""
    raise error(f"{path} is {kind}{via}: refusing to replace it with a file",
                hint="write to a regular file name instead")


@contextlib.contextmanager
def _replacing(path: Path, mode: int) -> Iterator[tuple[int, Path]]:
    """A temp file beside `path` (its fd and name, `mode` set); renamed over `path` on a clean exit,
    removed on any error, with OS errors said plainly (`disk_error`). Never over a device or FIFO."""
    refuse_special(path)
    try:
        path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise disk_error(e, path) from e
    try:
        os.fchmod(fd, mode)
        yield fd, Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: int = PRIVATE_FILE, binary: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit fsync it and rename it over `path`.
    On any error the temporary file is removed and `path` is untouched."""
    with _replacing(Path(path), mode) as (fd, _), \
            os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def replacing_dir(path: str | Path, mode: int = 0o755) -> Iterator[Path]:
    """A temp folder beside `path` to fill; on a clean exit it takes `path`'s place in one rename (a folder
    already there is moved aside first and removed after, or put back if the swap fails). On any error the
    temp folder goes and `path` is as it was; OS errors are said plainly (`disk_error`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:  # a read-only or full folder, a file somewhere up the path
        raise disk_error(e, path) from e
    old = None
    try:
        os.chmod(tmp, mode)  # mkdtemp makes it private
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
        if isinstance(e, OSError):
            raise disk_error(e, path) from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str, mode: int = PRIVATE_FILE) -> Path:
    """Write `data` to `path` atomically (temp file, fsync, rename), with `mode` (private by default)."""
    with atomic_open(path, mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_write_with(path: str | Path, write: Callable[[Path], None], mode: int = PRIVATE_FILE) -> Path:
    """For writers that want a file name (gguf, safetensors): `write(tmp)` fills a temp path, then rename."""
    path = Path(path)
    with _replacing(path, mode) as (fd, tmp):
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)  # a writer may have made the file anew
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path
