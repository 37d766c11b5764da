"""The store's one SQLite connection, shared by every aggregate: `_write` is the only place a transaction
begins, commits or rolls back, and `_pid` the only place an unknown profile is reported.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

from p2p_local import paths
from p2p_local.errors import StoreError
from p2p_local.store.migrations import available_upgrades, migrate, refuse_newer


class StoreBase:
    """The connection and its transactions; the aggregates subclass it and `Store` composes them."""

    def __init__(self, path: Path | str | None = None, readonly: bool | None = None) -> None:
        """Open (creating and upgrading) the store. `readonly=None`: read-only exactly when the database
        or its folder cannot be written (a read-only mount, a chmod'ed data dir), so reading commands
        still work there and writing ones fail with a StoreError saying why; True forces it."""
        self.path = Path(path) if path is not None else paths.store_path()
        self.readonly = not store_writable(self.path) if readonly is None else bool(readonly)
        self.conn = _connect_readonly(self.path) if self.readonly else _connect(self.path)
        try:
            if self.readonly:
                _check_schema_current(self.conn, self.path)
            else:
                migrate(self.conn)
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
    def import_lock(self, profile: str) -> Iterator[None]:
        """Serialize imports into one profile across processes (blocking): each reads what the profile holds
        to skip duplicates, then writes, and two at once would both add everything. One byte per profile
        (by a hash of its name) of a lock file beside the store: no file names the profile."""
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): the write transaction still keeps the store whole
            yield
            return
        offset = int(hashlib.sha256(profile.encode("utf-8")).hexdigest()[:7], 16)
        try:
            fd = os.open(self.path.with_name(self.path.name + ".import-lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot lock the profile store for an import: {e.strerror}",
                             hint="check the data dir's permissions") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            yield
        finally:
            os.close(fd)  # releases the lock

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
    except sqlite3.DatabaseError as e:
        raise StoreError(
            f"cannot open the profile store {path}: {e}",
            hint="if the file is damaged, move it aside (your profiles are in it) and run the command again",
        ) from e
    return conn


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


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """The store opened read-only (sqlite `mode=ro`): no file is created, changed or chmod'ed."""
    if not path.is_file():
        raise StoreError(f"there is no profile store at {path}, and its folder is read-only",
                         hint="set P2P_HOME to a writable directory (or make this one writable)")
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    last: sqlite3.Error | None = None
    # A WAL database on a read-only folder without its -shm file only opens as `immutable` (nothing
    # else can be writing it: the folder is read-only). Tried second, when plain mode=ro cannot read.
    for suffix in ("", "&immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(uri + suffix, uri=True, timeout=10.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.Error as e:
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

