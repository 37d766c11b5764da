"""Numbered schema upgrades: `upgrades/NNNN_name.sql`, applied in order, each recorded once.

A schema change is a new file, never an edit of an old one, so any older store can be brought up to date
on open. Each upgrade runs in one transaction with its row in `schema_upgrades`: a crash mid-upgrade leaves
the previous schema intact. A file may start with `-- requires: fts5`: where this SQLite lacks the feature
the upgrade is skipped (not recorded) and tried again on a later open.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from p2p_local.errors import StoreError

UPGRADES_DIR = Path(__file__).parent / "upgrades"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_REQUIRES = re.compile(r"^--\s*requires:\s*(.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Upgrade:
    version: int
    name: str
    sql: str
    requires: tuple[str, ...] = ()


def available_upgrades(directory: Path = UPGRADES_DIR) -> list[Upgrade]:
    """All upgrade files in `directory`, in version order."""
    ups: dict[int, Upgrade] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE_NAME.match(path.name)
        if not m:
            raise StoreError(f"bad schema upgrade file name {path.name}", hint="name it NNNN_name.sql")
        version = int(m.group(1))
        if version in ups:
            raise StoreError(f"two schema upgrades numbered {version:04d} in {directory}")
        sql = path.read_text(encoding="utf-8")
        requires = tuple(r.strip().lower() for m2 in _REQUIRES.finditer(sql) for r in m2.group(1).split(","))
        ups[version] = Upgrade(version, m.group(2), sql, requires)
    return [ups[v] for v in sorted(ups)]


def migrate(conn: sqlite3.Connection, upto: int | None = None, directory: Path = UPGRADES_DIR) -> list[int]:
    """Apply every pending upgrade (up to version `upto`, for tests); returns the versions applied.

    `conn` must be in autocommit mode (isolation_level=None): transactions are managed here.
    """
    known = available_upgrades(directory)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_upgrades ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_upgrades")}
    refuse_newer(applied, known)
    done = []
    for up in known:
        if up.version in applied or (upto is not None and up.version > upto):
            continue
        if not all(_has_feature(conn, feature) for feature in up.requires):
            continue
        if _apply(conn, up):
            done.append(up.version)
    return done


def refuse_newer(applied: set[int], known: list[Upgrade]) -> None:
    """A store a newer p2p-local has upgraded may hold what this one cannot read or keep intact."""
    newest = max((u.version for u in known), default=0)
    if applied and max(applied) > newest:
        raise StoreError(f"this store has schema version {max(applied)}, newer than this p2p-local knows ({newest})",
                         hint="upgrade p2p-local, or point P2P_HOME at another data dir")


def _apply(conn: sqlite3.Connection, up: Upgrade) -> bool:
    # Statements run one by one inside our own transaction (executescript would commit first).
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise StoreError(f"cannot upgrade the store schema: {e}", hint="close other p2p processes and retry") from e
    try:
        # Another process may have applied it while we waited for the write lock.
        if conn.execute("SELECT 1 FROM schema_upgrades WHERE version = ?", (up.version,)).fetchone():
            conn.execute("ROLLBACK")
            return False
        for statement in split_statements(up.sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_upgrades (version, name, applied) VALUES (?, ?, ?)",
            (up.version, up.name, time.time()),
        )
        conn.execute(f"PRAGMA user_version = {int(up.version)}")  # a quick look for sqlite3 users
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        conn.execute("ROLLBACK")
        raise StoreError(
            f"schema upgrade {up.version:04d}_{up.name}.sql failed: {e}",
            hint="the store was left as it was; please report this as a bug",
        ) from e
    return True


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements (CREATE TRIGGER bodies with ';' stay whole)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    rest = "\n".join(ln for ln in buf.splitlines() if not ln.strip().startswith("--")).strip()
    if rest:
        raise StoreError(f"unterminated SQL statement in schema upgrade: {rest[:60]!r}")
    return out


def _has_feature(conn: sqlite3.Connection, feature: str) -> bool:
    if feature == "fts5":
        try:
            conn.execute("CREATE VIRTUAL TABLE temp._p2p_fts5_probe USING fts5(x)")
            conn.execute("DROP TABLE temp._p2p_fts5_probe")
            return True
        except sqlite3.OperationalError:
            return False
    raise StoreError(f"schema upgrade requires unknown feature {feature!r}")
