"""The SQLite profile store: schema upgrades, profiles/items/history, adapter cache, forget, chat."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from p2p_local import paths
from p2p_local.errors import StoreError
from p2p_local.store import NewItem, Store
from p2p_local.store.migrations import available_upgrades, migrate, split_statements


@pytest.fixture
def store(p2p_home: Path):
    with Store() as s:
        yield s


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


# --- file, pragmas, migrations -------------------------------------------------------------------
def test_store_file_is_private_wal_and_under_data_dir(store: Store, p2p_home: Path):
    assert store.path == paths.store_path()
    assert store.path.resolve().parent == p2p_home.resolve()
    store.profiles.create_profile("alice", task="t")
    for f in p2p_home.glob("p2p.sqlite3*"):  # the db and its -wal/-shm companions
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_existing_loose_file_mode_is_tightened(p2p_home: Path):
    path = paths.store_path()
    path.touch(mode=0o644)
    path.chmod(0o644)
    Store().close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_all_upgrades_applied_in_order_and_recorded(store: Store):
    known = [u.version for u in available_upgrades()]
    assert known == sorted(known) and known[0] == 1 and len(known) >= 2
    rows = store.conn.execute("SELECT version FROM schema_upgrades ORDER BY version").fetchall()
    assert [r[0] for r in rows] == known
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == known[-1]
    assert migrate(store.conn) == []  # idempotent


def test_old_version_database_is_upgraded_keeping_its_data(p2p_home: Path):
    path = paths.store_path()
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, upto=1) == [1]  # a store written by the first release
    conn.execute("INSERT INTO profiles (name, task, created, updated) VALUES ('old', 't', 1, 1)")
    conn.execute("INSERT INTO items (profile_id, task, input, output, created, updated) VALUES (1, 't', 'x', 'y', 1, 1)")
    conn.execute("INSERT INTO conversations (profile_id, title, created) VALUES (1, 'c', 1)")
    conn.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (1, 'user', 'zebra crossing', 1)")
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'messages_fts'").fetchone() is None
    conn.close()

    with Store(path) as s:  # opening upgrades it
        versions = [r[0] for r in s.conn.execute("SELECT version FROM schema_upgrades ORDER BY version")]
        assert versions == [u.version for u in available_upgrades()]
        assert s.profiles.count_items("old") == 1
        assert s.db.has_fts
        hits = s.conversations.search_messages("zebra")  # written before the FTS upgrade, indexed by it
        assert [m.content for m in hits] == ["zebra crossing"]


def test_store_from_newer_release_is_refused(p2p_home: Path):
    Store().close()
    conn = sqlite3.connect(paths.store_path())
    conn.execute("INSERT INTO schema_upgrades VALUES (9999, 'future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store()


def test_failed_upgrade_rolls_back_completely(tmp_path: Path):
    ups = tmp_path / "ups"
    ups.mkdir()
    (ups / "0001_a.sql").write_text("CREATE TABLE a (x);\n")
    (ups / "0002_b.sql").write_text("CREATE TABLE b (x);\nINSERT INTO no_such_table VALUES (1);\n")
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    with pytest.raises(StoreError, match="0002_b.sql"):
        migrate(conn, directory=ups)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "a" in tables and "b" not in tables  # 0002's CREATE was rolled back with it
    assert [r[0] for r in conn.execute("SELECT version FROM schema_upgrades")] == [1]


def test_split_statements_keeps_trigger_bodies_whole():
    sql = "-- c\nCREATE TABLE t (x);\nCREATE TRIGGER g AFTER INSERT ON t BEGIN\n  SELECT 1;\n  SELECT 2;\nEND;\n-- end\n"
    parts = split_statements(sql)
    assert len(parts) == 2 and parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")


def test_corrupt_store_file_gives_store_error(p2p_home: Path):
    paths.store_path().write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot (open|read)") as e:
        Store()
    assert "move it aside" in e.value.hint


# --- profiles and items --------------------------------------------------------------------------
def test_profile_create_get_list_and_errors(store: Store):
    p = store.profiles.create_profile("alice", task="movielens-rating")
    assert (p.name, p.task, p.n_items, p.adapter_stale) == ("alice", "movielens-rating", 0, True)
    store.profiles.create_profile("bob")
    assert [x.name for x in store.profiles.list_profiles()] == ["alice", "bob"]
    with pytest.raises(StoreError, match="already exists"):
        store.profiles.create_profile("alice")
    with pytest.raises(StoreError, match="no profile named 'alicia'") as e:
        store.profiles.get_profile("alicia")
    assert "alice" in e.value.hint
    for bad in ("", "a b", "../x", "x" * 65, "-x"):
        with pytest.raises(StoreError, match="invalid profile name"):
            store.profiles.create_profile(bad)


def test_items_add_edit_delete_history_and_stale_flag(store: Store):
    store.profiles.create_profile("alice", task="t")
    store.adapters.record_adapter("alice", "fp", "bundle", paths.adapters_dir() / "a.gguf")
    assert not store.profiles.get_profile("alice").adapter_stale

    it = store.profiles.add_item("alice", None, "Heat (1995)", "5", time=100.0, meta={"movie_id": 6})
    assert (it.task, it.time, it.meta) == ("t", 100.0, {"movie_id": 6})
    assert store.profiles.get_profile("alice").adapter_stale  # any item change marks the adapter stale

    store.adapters.record_adapter("alice", "fp", "bundle", paths.adapters_dir() / "a.gguf")  # clears the flag
    edited = store.profiles.edit_item(it.id, output="4", task="other")
    assert (edited.output, edited.task, edited.input) == ("4", "other", "Heat (1995)")
    assert store.profiles.get_profile("alice").adapter_stale

    store.adapters.record_adapter("alice", "fp", "bundle", paths.adapters_dir() / "a.gguf")  # clears the flag
    store.profiles.delete_item(it.id)
    assert store.profiles.get_profile("alice").adapter_stale
    assert store.profiles.count_items("alice") == 0

    h = store.profiles.item_history(it.id)  # survives the item
    assert [e.action for e in h] == ["add", "edit", "delete"]
    assert h[0].old is None and h[0].new["output"] == "5" and h[0].new["meta"] == {"movie_id": 6}
    assert h[1].old["output"] == "5" and h[1].new["output"] == "4" and h[1].new["task"] == "other"
    assert h[2].old["output"] == "4" and h[2].new is None

    with pytest.raises(StoreError, match="no item"):
        store.profiles.edit_item(it.id, output="3")
    with pytest.raises(StoreError, match="cannot edit"):
        store.profiles.edit_item(1, profile_id=2)


def test_item_without_any_task_is_refused(store: Store):
    store.profiles.create_profile("notask")
    with pytest.raises(StoreError, match="no default task"):
        store.profiles.add_item("notask", None, "a", "b")
    assert store.profiles.count_items("notask") == 0
    store.profiles.add_item("notask", "notes", "a", "b")
    assert store.profiles.task_counts("notask") == {"notes": 1}


def test_add_items_is_all_or_nothing(store: Store):
    store.profiles.create_profile("alice", task="t")
    store.profiles.add_items("alice", [NewItem("a", "1", 1.0)])

    def items():
        yield NewItem("b", "2", 2.0)
        yield NewItem("c", "", 3.0)  # invalid: empty output

    with pytest.raises(StoreError, match="output"):
        store.profiles.add_items("alice", items())
    assert [i.input for i in store.profiles.items("alice")] == ["a"]
    assert store.conn.execute("SELECT COUNT(*) FROM item_history").fetchone()[0] == 1


def test_items_order_limit_task_filter_and_counts(store: Store):
    store.profiles.create_profile("alice", task="a")
    store.profiles.add_items("alice", [NewItem(f"i{t}", "x", float(t), task="b" if t % 3 == 0 else None) for t in (5, 1, 4, 3, 2)])
    store.profiles.add_items("alice", [NewItem("untimed", "x", None)])
    assert [i.input for i in store.profiles.items("alice")] == ["untimed", "i1", "i2", "i3", "i4", "i5"]
    assert [i.input for i in store.profiles.items("alice", limit=2)] == ["i4", "i5"]  # newest two, time order
    assert [i.input for i in store.profiles.items("alice", task="b")] == ["i3"]
    assert store.profiles.count_items("alice") == 6 and store.profiles.count_items("alice", task="a") == 5
    assert store.profiles.task_counts("alice") == {"a": 5, "b": 1}
    assert store.profiles.list_profiles()[0].n_items == 6


def test_listing_uses_indexes(store: Store):
    plan = " ".join(
        r[3] for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM items WHERE profile_id = 1 ORDER BY time DESC, id DESC LIMIT 10"
        )
    )
    assert "USING INDEX items_by_profile_time" in plan and "TEMP B-TREE" not in plan
    plan = " ".join(
        r[3] for r in store.conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM items WHERE profile_id = 1 AND task = 't' ORDER BY time DESC, id DESC LIMIT 10"
        )
    )
    assert "items_by_profile_task_time" in plan and "TEMP B-TREE" not in plan


def test_export_round_trips_through_the_importer(store: Store, tmp_path: Path):
    from p2p_local.importers import import_file

    store.profiles.create_profile("alice", task="main")
    store.profiles.add_item("alice", None, "first", "1", time=10.0, meta={"k": "v"})
    store.profiles.add_item("alice", "side", "second", "2", time=20.0)
    data = store.profiles.export_profile("alice")
    assert data["user_id"] == "alice" and data["task"] == "main"
    assert data["items"][0] == {"input": "first", "output": "1", "time": 10.0, "meta": {"k": "v"}}
    assert data["items"][1]["meta"] == {"task": "side"}  # the non-default task travels in meta

    import json

    f = tmp_path / "alice.json"
    f.write_text(json.dumps(data))
    store.profiles.create_profile("copy")
    import_file(store, "copy", f)
    got = [(i.input, i.output, i.time, i.task, i.meta) for i in store.profiles.items("copy")]
    assert got == [("first", "1", 10.0, "main", {"k": "v"}), ("second", "2", 20.0, "side", {})]
    assert store.profiles.get_profile("copy").task == "main"  # took the import's task as its default


# --- adapter cache and forget --------------------------------------------------------------------
def test_adapter_cache_checks_the_file(store: Store):
    store.profiles.create_profile("alice", task="t")
    assert store.adapters.cached_adapter("alice", "fp1", "b1") is None
    f = store.adapters.adapter_dir("alice") / "fp1.gguf"
    f.write_bytes(b"GGUF")
    store.adapters.record_adapter("alice", "fp1", "b1", f)
    assert store.adapters.cached_adapter("alice", "fp1", "b1") == f.resolve()
    assert store.adapters.cached_adapter("alice", "fp1", "other-bundle") is None
    f.unlink()
    assert store.adapters.cached_adapter("alice", "fp1", "b1") is None  # and the dead row is gone
    assert store.adapters.all("alice") == []


def test_prune_adapters_keeps_newest(store: Store):
    store.profiles.create_profile("alice", task="t")
    files = []
    for k in range(4):
        f = store.adapters.adapter_dir("alice") / f"{k}.gguf"
        f.write_bytes(b"x")
        store.adapters.record_adapter("alice", f"fp{k}", "b", f)
        files.append(f)
    assert store.adapters.prune_adapters("alice", keep=1) == 3
    assert [a.fingerprint for a in store.adapters.all("alice")] == ["fp3"]
    assert [f.exists() for f in files] == [False, False, False, True]


def test_forget_removes_rows_files_and_the_text_itself(store: Store, p2p_home: Path, tmp_path: Path):
    secret = "Zanzibar-Secret-Movie-4711"
    store.profiles.create_profile("alice", task="t")
    store.profiles.create_profile("bob", task="t")
    store.profiles.add_items("alice", [NewItem(f"{secret} {i}", "5", float(i)) for i in range(300)])
    store.profiles.add_item("bob", None, "bob's item", "3")
    adapter = store.adapters.adapter_dir("alice") / "fp.gguf"
    adapter.write_bytes(b"GGUF adapter")
    store.adapters.record_adapter("alice", "fp", "b", adapter)
    outside = tmp_path / "users-own-file.gguf"  # a recorded path outside the data dir is never deleted
    outside.write_bytes(b"x")
    store.adapters.record_adapter("alice", "fp2", "b", outside)
    conv = store.conversations.new_conversation("alice", "about movies")
    store.conversations.add_message(conv, "user", f"tell me about {secret}")
    base_conv = store.conversations.new_conversation(None, "no profile")
    store.conversations.add_message(base_conv, "user", "hello")

    report = store.forget_profile("alice")
    assert (report.items, report.adapters, report.conversations, report.messages) == (300, 2, 1, 1)
    assert report.files_removed == 1
    assert not adapter.exists() and not adapter.parent.exists()
    assert outside.exists()

    c = store.conn
    assert c.execute("SELECT COUNT(*) FROM profiles WHERE name = 'alice'").fetchone()[0] == 0
    for table in ("items", "item_history", "adapters"):
        assert c.execute(f"SELECT COUNT(*) FROM {table} WHERE profile_id = 1").fetchone()[0] == 0, table
    assert c.execute("SELECT COUNT(*) FROM messages WHERE content LIKE '%Zanzibar%'").fetchone()[0] == 0
    assert store.profiles.count_items("bob") == 1 and len(store.conversations.all()) == 1
    assert store.conversations.search_messages("Zanzibar") == []
    store.close()
    # secure_delete + checkpoint: the text is gone from the files, not just unlinked.
    for f in p2p_home.glob("p2p.sqlite3*"):
        assert secret.encode() not in f.read_bytes(), f
    with _raw(paths.store_path()) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --- conversations -------------------------------------------------------------------------------
def test_conversations_messages_and_search(store: Store):
    store.profiles.create_profile("alice", task="t")
    c1 = store.conversations.new_conversation("alice", "Weekend films")
    store.conversations.add_message(c1, "user", "Which thriller should I watch tonight?")
    store.conversations.add_message(c1, "assistant", "Try Heat (1995).", {"mode": "personalized", "scale": 1.0, "adapter": "x.gguf"})
    c2 = store.conversations.new_conversation(None)
    store.conversations.add_message(c2, "user", "A thriller without a profile?")

    convs = store.conversations.all()
    assert [(c.id, c.profile, c.n_messages) for c in convs] == [(c2, None, 1), (c1, "alice", 2)]
    assert [c.id for c in store.conversations.all("alice")] == [c1]
    msgs = store.conversations.messages(c1)
    assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].meta["scale"] == 1.0

    assert {m.conversation_id for m in store.conversations.search_messages("thriller")} == {c1, c2}
    assert [m.conversation_id for m in store.conversations.search_messages("thriller", profile="alice")] == [c1]
    assert len(store.conversations.search_messages('heat" *(:')) == 1  # user text is never FTS syntax
    assert store.conversations.search_messages("   ") == []

    assert store.conversations.get_conversation(c1).n_messages == 2
    with pytest.raises(StoreError, match="no conversation"):
        store.conversations.add_message(c2 + 1, "user", "x")
    with pytest.raises(StoreError, match="role"):
        store.conversations.add_message(c1, "robot", "x")


def test_search_falls_back_to_like_without_fts(store: Store):
    c = store.conversations.new_conversation()
    store.conversations.add_message(c, "user", "100% sure_thing")
    store.db.has_fts = False
    assert len(store.conversations.search_messages("sure_thing")) == 1
    assert store.conversations.search_messages("sure_x") == []  # '_' is literal, not a wildcard


def test_item_ids_are_never_reused_so_history_stays_separate(store: Store):
    store.profiles.create_profile("alice", task="t")
    a = store.profiles.add_item("alice", None, "a", "1")
    store.profiles.delete_item(a.id)  # the highest id goes away...
    b = store.profiles.add_item("alice", None, "b", "2")
    assert b.id != a.id  # ...and is not handed out again
    assert [e.action for e in store.profiles.item_history(a.id)] == ["add", "delete"]
    assert [e.action for e in store.profiles.item_history(b.id)] == ["add"]


def test_recreated_profile_gets_a_fresh_adapter_dir(store: Store):
    store.profiles.create_profile("alice", task="t")
    old_dir = store.adapters.adapter_dir("alice")
    store.forget_profile("alice")
    store.profiles.create_profile("alice", task="t")
    assert store.adapters.adapter_dir("alice") != old_dir
