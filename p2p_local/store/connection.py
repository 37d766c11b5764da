"""The store's one SQLite connection, shared by every aggregate: `_write` is the only place a transaction
begins, commits or rolls back, and `_pid` the only place an unknown profile is reported.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

from p2p_local import paths
from p2p_local.errors import StoreError
from p2p_local.store.migrations import available_upgrades, migrate, refuse_newer

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class StoreBase:
    """The connection and its transactions, shared by the aggregates `Store` composes (each holds it as `db`)."""

    def __init__(self, path: Path | str | None = None, readonly: bool | None = None, snapshot: bool = False) -> None:
        """Open (creating and upgrading) the store. `readonly=None`: read-only exactly when the database
        or its folder cannot be written (a read-only mount, a chmod'ed data dir), so reading commands
        still work there and writing ones fail with a StoreError saying why; True forces it. `snapshot`
        (read-only, a short read such as a dry run): leave no file behind either, not even SQLite's -wal and
        -shm, when no other process has the store open."""
        self.path = Path(path) if path is not None else paths.store_path()
        self.readonly = not store_writable(self.path) if readonly is None else bool(readonly)
        self.conn = _connect_readonly(self.path, snapshot) if self.readonly or snapshot else _connect(self.path)
        self.readonly = self.readonly or snapshot
        try:
            if self.readonly:
                _check_schema_current(self.conn, self.path)
            else:
                migrate(self.conn)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # pages damaged past the header
            self.conn.close()
            raise damaged(self.path, e) from e
        except BaseException:
            self.conn.close()
            raise
        self.has_fts = bool(
            self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone()
        )

    def close(self) -> None:
        self.conn.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction around several store calls (all or nothing): `import --create` makes the
        profile and its items together, so a kill mid-way leaves no empty profile behind."""
        return self._write()

    @contextmanager
    def profile_lock(self, profile: str) -> Iterator[None]:
        """One profile's changes, one at a time, across processes and threads (blocking): an import (it reads
        what the profile holds to skip duplicates, then writes), an answer's adapter file and its cache row, an
        export, and `forget_profile`, so no adapter or export made from a forgotten profile survives it.
        Re-entrant in a thread (an export makes its adapter under the lock)."""
        with _profile_lock(self.path.with_name(self.path.name + ".import-lock"), profile):
            yield

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front (no upgrade deadlocks). Nested
        uses join the outer transaction (`transaction()`)."""
        if self.conn.in_transaction and getattr(self, "_outer", False):
            yield self.conn
            return
        if self.readonly:
            raise StoreError(f"the profile store {self.path} is read-only here: this command changes it",
                             hint="reading commands (profile list / show / export) work; to change profiles, "
                                  "make the data dir writable or point P2P_HOME at a writable copy")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"the profile store is busy: {e}", hint="another p2p process is writing; retry") from e
        try:
            self._outer = True
            try:
                yield self.conn
            finally:
                self._outer = False
            self.conn.execute("COMMIT")
        except BaseException as e:
            # SQLite rolls back by itself on some errors (a full disk): then a ROLLBACK here would fail
            # and hide the real error behind "cannot rollback - no transaction is active".
            if self.conn.in_transaction:
                with suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower():
                raise StoreError(f"disk full: cannot write the profile store {self.path} ({e})",
                                 hint="free some space and try again; nothing was changed") from e
            if isinstance(e, sqlite3.OperationalError):
                raise StoreError(f"the profile store {self.path} could not be written: {e}",
                                 hint="check the data dir's disk and permissions; nothing was changed") from e
            raise

    def _pid(self, name: str) -> int:
        """A profile's id (cheap: no item count); the unknown-profile error lives here."""
        row = self.conn.execute("SELECT id FROM profiles WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r[0] for r in self.conn.execute("SELECT name FROM profiles ORDER BY name")]
            close = difflib.get_close_matches(str(name), known, n=1)
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif known:
                hint = f"known profiles: {', '.join(known[:10])}"
            else:
                hint = f"create it: p2p profile create {name}"
            raise StoreError(f"no profile named {name!r}", hint=hint)
        return row[0]


class _Held:
    """A profile's lock in this process: its thread lock and how deep the holding thread is in it."""

    def __init__(self) -> None:
        self.rlock, self.depth = threading.RLock(), 0


_HELD: dict[tuple[str, str], _Held] = {}
_LOCK_FILES: dict[str, int] = {}  # lock file -> one descriptor for the process's life (see below)
_GUARD = threading.Lock()


@contextmanager
def _profile_lock(lock_file: Path, profile: str) -> Iterator[None]:
    """A thread lock per profile, and (outermost only) a POSIX lock on one byte of `lock_file` chosen by a
    hash of the name (no file names the profile). The descriptor stays open: closing any descriptor of a file
    drops every POSIX lock the process holds on it, another thread's included."""
    with _GUARD:
        held = _HELD.setdefault((str(lock_file), profile), _Held())
    with held.rlock:
        outermost = held.depth == 0
        fd, offset = -1, int(hashlib.sha256(profile.encode("utf-8")).hexdigest()[:7], 16)
        if outermost and fcntl is not None:  # no POSIX locks (Windows): the transactions keep the store whole
            with _GUARD:
                fd = _LOCK_FILES.get(str(lock_file), -1)
                if fd < 0:
                    try:
                        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
                    except OSError as e:
                        raise StoreError(f"cannot lock the profile store: {e.strerror}",
                                         hint="check the data dir's permissions") from e
                    _LOCK_FILES[str(lock_file)] = fd
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if outermost and fd >= 0:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file 0600 before SQLite does (it would use the umask); the -wal and -shm files
        # SQLite creates later copy the database file's permissions.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
    except OSError as e:
        raise StoreError(f"cannot create the profile store {path}: {e.strerror}",
                         hint="set P2P_HOME to a writable directory") from e
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)  # we manage transactions
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses no commit
        conn.execute("PRAGMA secure_delete = ON")  # forgotten text is overwritten, not left in free pages
        # After a big import the WAL is checkpointed (autocheckpoint) and, on the next write, cut back
        # to this size instead of keeping a copy of the whole import on disk.
        conn.execute("PRAGMA journal_size_limit = 16777216")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:  # random bytes: a garbage journal-mode name too
        raise damaged(path, e) from e
    return conn


def damaged(path: Path, e: BaseException) -> StoreError:
    """The one error of a store SQLite cannot read, wherever it shows (opening, upgrading, any later query)."""
    what = str(e) if isinstance(e, sqlite3.Error) else "unreadable contents"
    return StoreError(f"cannot read the profile store {path}: {what}",
                      hint="if the file is damaged, move it aside (your profiles are in it) and run the command again")


def store_writable(path: Path) -> bool:
    """Whether the store at `path` can be written: the file (when it exists) and its folder (SQLite
    creates the -wal and -shm files beside it). access(2) also says no on a read-only mount, for root too."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # a store not created yet: the first folder that exists decides
    if (path.exists() and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        return not (os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return True


def _connect_readonly(path: Path, snapshot: bool = False) -> sqlite3.Connection:
    """The store opened read-only (sqlite `mode=ro`): no file is created, changed or chmod'ed. A `snapshot`
    opens `immutable` first when there is no -wal file (SQLite removes it when the last connection closes, so
    nothing has the store open): a plain `mode=ro` reader would create -wal and -shm files and leave them."""
    if not path.is_file():
        raise StoreError(f"there is no profile store at {path}, and its folder is read-only",
                         hint="set P2P_HOME to a writable directory (or make this one writable)")
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    last: sqlite3.Error | None = None
    # A WAL database on a read-only folder without its -shm file only opens as `immutable` (nothing
    # else can be writing it: the folder is read-only). Tried second, when plain mode=ro cannot read.
    idle = snapshot and not path.with_name(path.name + "-wal").exists()
    for suffix in ("&immutable=1", "") if idle else ("", "&immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(uri + suffix, uri=True, timeout=10.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except (sqlite3.Error, UnicodeDecodeError) as e:
            last = e
            if conn is not None:
                conn.close()
    raise StoreError(f"cannot open the profile store {path} read-only: {last}",
                     hint="check that the file is readable; if it is damaged, restore it from a backup")


def _check_schema_current(conn: sqlite3.Connection, path: Path) -> None:
    """A read-only store cannot be upgraded: refuse one this version would have to change first."""
    try:
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_upgrades")}
    except sqlite3.Error:
        applied = set()
    known = available_upgrades()
    refuse_newer(applied, known)
    pending = [u.version for u in known if u.version not in applied and not u.requires]
    if pending:
        raise StoreError(f"the profile store {path} is read-only and needs a schema upgrade first "
                         f"({', '.join(f'{v:04d}' for v in pending)})",
                         hint="run any p2p command once with the data dir writable")

