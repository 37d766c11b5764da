"""The cache of generated adapters: where a profile's files live, which was made from which profile state
and bundle (checked against its sha256 on every use), and pruning old ones (only inside the data dir)."""

from __future__ import annotations

import logging
import shutil
import time as _time
from pathlib import Path

from p2p_local import paths
from p2p_local.files import disk_error, sha256_file
from p2p_local.store.connection import StoreBase
from p2p_local.store.records import AdapterRecord

log = logging.getLogger(__name__)


class AdapterCache:
    """The adapter-cache aggregate (a part of `Store`)."""

    def __init__(self, db: StoreBase) -> None:
        self.db = db

    def adapter_dir(self, profile: str, create: bool = True) -> Path:
        """Where this profile's adapter files belong (by id: a re-created name starts clean).
        `forget_profile` removes this whole directory."""
        # Beside this store, not the data dir's: a store elsewhere (a benchmark's, a test's) numbers its
        # profiles from 1 too, and its adapters once landed in the user's profile-1 folder.
        d = self.db.path.parent / paths.ADAPTERS / f"profile-{self.db._pid(profile)}"
        if create:
            try:
                paths.private_dir(d)
            except OSError as e:
                raise disk_error(e, d) from e
        return d

    def cached_adapter(self, profile: str, fingerprint: str, bundle_hash: str) -> Path | None:
        """The adapter made from this exact profile state and bundle, if its file is still the one written
        (its sha256 is checked on every use): a missing, replaced or corrupted file, or one from before
        checksums, is dropped with a warning, and None makes the caller regenerate it, once."""
        row = self.db.conn.execute(
            "SELECT id, path, sha256 FROM adapters WHERE profile_id = ? AND fingerprint = ? AND bundle_hash = ?",
            (self.db._pid(profile), fingerprint, bundle_hash),
        ).fetchone()
        if row is None:
            return None
        path = Path(row["path"])
        problem = _cached_file_problem(path, row["sha256"])
        if problem is None:
            return path
        log.warning("warning: cached adapter %s %s; regenerating it", path.name, problem)
        with self.db._write() as c:
            c.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
        _remove_cached(path)
        return None

    def record_adapter(self, profile: str, fingerprint: str, bundle_hash: str, path: Path | str) -> None:
        """Remember an adapter made for the profile's current state (clears the stale flag), with its sha256."""
        pid = self.db._pid(profile)
        path = Path(path).resolve()
        try:
            digest = sha256_file(path)
        except OSError:
            digest = None  # unreadable now: recorded untrusted, so its first use regenerates it
        now = _time.time()
        with self.db._write() as c:
            c.execute(
                "INSERT INTO adapters (profile_id, fingerprint, bundle_hash, path, created, sha256)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (profile_id, fingerprint, bundle_hash) DO UPDATE SET path = excluded.path,"
                " created = excluded.created, sha256 = excluded.sha256",
                (pid, fingerprint, bundle_hash, str(path), now, digest),
            )
            c.execute("UPDATE profiles SET adapter_stale = 0 WHERE id = ?", (pid,))

    def all(self, profile: str) -> list[AdapterRecord]:
        """Cached adapters of a profile, newest first."""
        pid = self.db._pid(profile)
        rows = self.db.conn.execute("SELECT * FROM adapters WHERE profile_id = ? ORDER BY created DESC, id DESC", (pid,))
        return [AdapterRecord(r["fingerprint"], r["bundle_hash"], Path(r["path"]), r["created"]) for r in rows]

    def prune_adapters(self, profile: str, keep: int = 3) -> int:
        """Delete all but the `keep` newest cached adapters (rows and files); returns how many went."""
        old = self.all(profile)[keep:]
        pid = self.db._pid(profile)
        with self.db._write() as c:
            for a in old:
                c.execute("DELETE FROM adapters WHERE profile_id = ? AND path = ?", (pid, str(a.path)))
        for a in old:
            remove_private(a.path)
        return len(old)


def _cached_file_problem(path: Path, sha256: str | None) -> str | None:
    """Why a cached adapter file cannot be served as is, or None when it is exactly what was written."""
    if not path.exists():
        return "is missing"
    if not path.is_file():
        return "is not a regular file"
    if not sha256:
        return "has no recorded checksum (made by an older version)"
    try:
        if sha256_file(path) != sha256:
            return "does not match its checksum (the file was changed or damaged)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def _remove_cached(path: Path) -> None:
    """Clear the way for a regenerated adapter: the bad file, or an empty directory in its place."""
    try:
        if path.is_dir():
            path.rmdir()  # only when empty: a folder with content is the user's, and the write says so
        else:
            remove_private(path)
    except OSError:
        pass


def remove_private(path: Path) -> int:
    """Delete an adapter file or directory, but only inside our data dir; returns files removed."""
    try:
        path.resolve().relative_to(paths.data_dir().resolve())
    except ValueError:
        return 0  # never delete a user's file that merely sits elsewhere
    if path.is_dir():
        n = sum(1 for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return n
    if path.is_file():
        path.unlink(missing_ok=True)
        return 1
    return 0

