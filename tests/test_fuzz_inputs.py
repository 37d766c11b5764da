"""Fuzzing what a user can feed p2p-local: import files, adapters, bundle manifests, CLI arguments.

Each test asserts only this: success, or a P2PError with a message and a hint; never another
exception, never a hang (hypothesis' deadline), and the store intact afterwards.

Budgets: `make test` runs the `ci` profile (a few hundred examples in all, well under 60 s on 2 cores);
`make fuzz` runs the `fuzz` profile (HYPOTHESIS_PROFILE=fuzz: thousands per test).
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from p2p_lab.robustness import write_raw_adapter
from p2p_local.adapter import KEY_LORA_ALPHA, BaseInfo, validate_adapter
from p2p_local.errors import AdapterError, P2PError
from p2p_local.importers import read_import

settings.register_profile("ci", max_examples=120, deadline=timedelta(seconds=5), derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=3000, deadline=timedelta(seconds=10),
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def clean(e: P2PError) -> None:
    """What every refusal must carry: a message and a hint (the CLI prints both, nothing else)."""
    assert str(e.args[0]).strip() and e.hint, repr(e)


# --- import files ----------------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.sampled_from(["input", "output", "time", "meta", "task", "user_id", "items", "x"]), kids, max_size=5),
    max_leaves=25)
item = st.fixed_dictionaries({"input": json_value, "output": json_value},
                             optional={"time": json_value, "meta": json_value, "task": json_value})


def _csv_field(s: str) -> str:
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n\r') else s


@st.composite
def import_file_text(draw) -> tuple[str, str]:
    kind = draw(st.sampled_from(["jsonl", "json", "csv", "raw"]))
    if kind == "jsonl":
        lines = draw(st.lists(st.one_of(item, st.fixed_dictionaries({"user_id": json_value, "items": st.lists(item, max_size=4)}),
                                        json_value), max_size=5))
        return ".jsonl", "\n".join(json.dumps(x, allow_nan=True) for x in lines)
    if kind == "json":
        return ".json", json.dumps(draw(st.one_of(st.lists(item, max_size=5), json_value)), allow_nan=True)
    if kind == "csv":
        cols = draw(st.lists(st.sampled_from(["input", "output", "time", "task", "user_id", "x"]), min_size=1, max_size=6))
        rows = draw(st.lists(st.lists(st.text(max_size=20), min_size=0, max_size=len(cols) + 1), max_size=6))
        return ".csv", "\n".join(",".join(_csv_field(c) for c in r) for r in [cols, *rows])
    return draw(st.sampled_from([".csv", ".json", ".jsonl", ".txt"])), draw(st.text(max_size=200))


@given(import_file_text(), st.sampled_from(["auto", "jsonl", "json", "csv"]), st.none() | st.text(max_size=5))
def test_fuzz_importers(tmp_path_factory, spec: tuple[str, str], fmt: str, user: str | None) -> None:
    suffix, text = spec
    path = tmp_path_factory.mktemp("imp") / f"f{suffix}"
    try:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    except UnicodeEncodeError:
        assume(False)
    try:
        parsed = read_import(path, fmt, user=user)
    except P2PError as e:
        clean(e)
        return
    for it in parsed.items:  # what is accepted is storable and displayable
        assert isinstance(it.input, str) and it.input.strip() and isinstance(it.output, str)
        assert it.time is None or -2_208_988_800 <= it.time <= 4_102_444_800
        json.dumps(it.meta)


@given(st.binary(max_size=400), st.sampled_from(["auto", "jsonl", "json", "csv", "movielens"]))
def test_fuzz_importers_on_bytes(tmp_path_factory, data: bytes, fmt: str) -> None:
    path = tmp_path_factory.mktemp("bin") / "ratings.csv"
    path.write_bytes(data)
    try:
        read_import(path, fmt)
    except P2PError as e:
        clean(e)


# --- adapters --------------------------------------------------------------------------------------
SHAPES = {f"blk.{i}.{m}.weight": s for i in range(2) for m, s in (("attn_q", (16, 8)), ("attn_v", (4, 8)))}
SHAPES["token_embd.weight"] = (32, 8)
BASE = BaseInfo(arch="gemma3", sha256="ab" * 32, shapes=SHAPES, n_layers=2)
NAMES = [*SHAPES, "blk.2.attn_q.weight", "blk.0.ffn_up.weight", "output.weight"]
DTYPES = [np.float32, np.float16, np.float64, np.int32]


@st.composite
def adapter_tensors(draw) -> dict[str, np.ndarray]:
    out = {}
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True)):
        n_out, n_in = SHAPES.get(name, (16, 8))
        r = draw(st.integers(0, 9))
        dtype = draw(st.sampled_from(DTYPES))
        shape_a = draw(st.sampled_from([(r, n_in), (n_in, r), (r, n_in + 1), (1, r, n_in)]))
        shape_b = draw(st.sampled_from([(n_out, r), (r, n_out), (n_out, r + 1)]))
        fill = draw(st.sampled_from([0.01, 1e5, np.inf, np.nan]))
        suffixes = draw(st.sampled_from([(".lora_a", ".lora_b"), (".lora_a",), (".lora_b", ".weird")]))
        for suffix, shape in zip(suffixes, (shape_a, shape_b), strict=False):
            with np.errstate(over="ignore", invalid="ignore"):  # inf/nan into ints is part of the fuzz
                out[name + suffix] = np.full(shape, fill if draw(st.booleans()) else 0.01).astype(dtype)
    return out


def _write_raw(path: Path, tensors: dict[str, np.ndarray], alpha: object) -> None:
    kv = {KEY_LORA_ALPHA: ("int32", alpha)} if isinstance(alpha, int) else None
    write_raw_adapter(path, {}, alpha=alpha if isinstance(alpha, float) else None, extra=tensors, kv=kv)


def _llama_cpp_safe(adapter) -> None:
    """The oracle, independent of the validator: what llama.cpp needs to neither abort nor refuse."""
    ranks = set()
    for name, (a, b) in adapter.tensors.items():
        n_out, n_in = SHAPES[name]
        assert name.startswith("blk.") and a.ndim == 2 and b.ndim == 2, name
        r = a.shape[0]
        assert r >= 1 and a.shape == (r, n_in) and b.shape == (n_out, r), (name, a.shape, b.shape)
        assert np.isfinite(a).all() and np.isfinite(b).all()
        ranks.add(r)
    assert len(ranks) == 1 and np.isfinite(adapter.alpha) and adapter.alpha > 0


@given(adapter_tensors(), st.sampled_from([4.0, 0.0, -1.0, float("nan"), 16, None]))
def test_fuzz_adapter_validator(tmp_path_factory, tensors: dict, alpha: object) -> None:
    path = tmp_path_factory.mktemp("ad") / "a.gguf"
    try:
        _write_raw(path, tensors, alpha)
    except (ValueError, TypeError):  # gguf itself refuses this shape/dtype: nothing to validate
        assume(False)
    try:
        adapter = validate_adapter(path, BASE)
    except AdapterError as e:
        clean(e)
        return
    _llama_cpp_safe(adapter)


GOOD = None


def _good_adapter_bytes(tmp: Path) -> bytes:
    global GOOD
    if GOOD is None:
        rng = np.random.default_rng(0)
        t = {}
        for name in ("blk.0.attn_q.weight", "blk.1.attn_v.weight"):
            n_out, n_in = SHAPES[name]
            t[name + ".lora_a"] = rng.normal(size=(2, n_in)).astype(np.float16)
            t[name + ".lora_b"] = rng.normal(size=(n_out, 2)).astype(np.float16)
        _write_raw(tmp / "good.gguf", t, 4.0)
        GOOD = (tmp / "good.gguf").read_bytes()
    return GOOD


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.none() | st.integers(0, 10_000))
def test_fuzz_adapter_bytes(tmp_path_factory, flips: list[tuple[int, int]], cut: int | None) -> None:
    tmp = tmp_path_factory.mktemp("flip")
    data = bytearray(_good_adapter_bytes(tmp))
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp / "bad.gguf"
    path.write_bytes(bytes(data))
    try:
        adapter = validate_adapter(path, BASE)
    except AdapterError as e:
        clean(e)
        return
    _llama_cpp_safe(adapter)


# --- bundle manifests ------------------------------------------------------------------------------
def _shipped_bundle() -> Path:
    from p2p_local.paths import repo_root

    return repo_root() / "models" / "gemma3-270m-p2p"


@pytest.mark.skipif(not (_shipped_bundle() / "manifest.json").is_file(), reason="no shipped bundle")
@given(st.lists(st.tuples(st.text(min_size=0, max_size=3).map(lambda s: s or "0"), json_value), min_size=1, max_size=3),
       st.integers(0, 1000))
@settings(max_examples=min(settings().max_examples, 25), phases=[Phase.explicit, Phase.generate],
          report_multiple_bugs=False)  # no shrinking: every example loads an ONNX session
def test_fuzz_bundle_manifest(tmp_path_factory, changes: list, pick: int) -> None:
    """Replace a (nested) manifest field by a random JSON value: the loader refuses it cleanly or loads."""
    from p2p_local.bundle import Bundle

    src = _shipped_bundle()
    manifest = json.loads((src / "manifest.json").read_text())
    for _, value in changes:
        node, keys = manifest, []
        while isinstance(node, dict) and node:  # walk down to a random field
            key = sorted(node)[pick % len(node)]
            keys.append(key)
            if not isinstance(node[key], dict) or pick % 3 == 0:
                node[key] = value
                break
            node = node[key]
    d = tmp_path_factory.mktemp("bundle")
    for f in src.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, d / f.name)
    (d / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
    try:
        Bundle.load(d, threads=1)
    except P2PError as e:
        clean(e)


# --- CLI arguments -----------------------------------------------------------------------------------
ARG_WORDS = ["alice", "bob", "alice\n", "", "-", "--json", "--items", "--task", "movielens-rating", "--input",
             "--output", "--time", "--meta", "--yes", "--mode", "-o", "1", "0", "-1", "99999999999999999999",
             "inf", "1e300", "{}", "[1]", '{"a":' * 50, "x" * 300, "\ud800", "/dev/zero", "/", "5"]
ACTIONS = ["create", "list", "show", "add", "edit", "delete", "history", "forget", "export", "import"]


@given(st.sampled_from(ACTIONS), st.lists(st.sampled_from(ARG_WORDS) | st.text(max_size=12), max_size=7))
def test_fuzz_cli_arguments(p2p_home, tmp_path_factory, capsys, action: str, words: list[str]) -> None:
    from p2p_local.cli import main
    from p2p_local.store import Store

    with Store() as s:  # something for the commands to act on
        if not s.profiles.profile_exists("alice"):
            s.profiles.create_profile("alice", task="movielens-rating")
            s.profiles.add_item("alice", None, "Heat (1995)", "5", time=1_700_000_000)
    os.chdir(tmp_path_factory.mktemp("cwd"))  # a relative -o writes here, never into the repo
    try:
        code = main(["profile", action, *words])
    except SystemExit as e:  # argparse's usage error: exit 2
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (0, 1, 2, 3, 4, 5, 6, 7), (code, err)
    db = sqlite3.connect(Path(os.environ["P2P_HOME"]) / "p2p.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


@given(st.sampled_from(["no-such", "../x", "/etc/passwd", "", "-", "a" * 70, "\ud800"])
       | st.text(max_size=12))
def test_fuzz_chat_model_names(p2p_home, capsys, name: str) -> None:
    """`--model NAME` (free chat on a model of the user's choice): anything but a registered instruct
    model is a clear error before a model loads (a known base without a template: tests/test_chat_model.py)."""
    from p2p_local.cli import main
    from p2p_local.models import known_models

    assume(name not in known_models())
    try:
        code = main(["ask", "hi", "--model", name, "--task", "chat"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert code in (2, 3), (code, err)


@pytest.fixture(autouse=True)
def _keep_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


# --- the surfaces of issue 19: git log, scrub, Letterboxd, export names, terminal text, stdin --------------
path_text = st.text(st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)), min_size=1, max_size=12)
message_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=60)


@given(st.lists(st.tuples(st.booleans(), st.lists(path_text, min_size=1, max_size=4, unique=True), message_text),
                min_size=1, max_size=3))
@settings(max_examples=min(settings().max_examples, 15), deadline=timedelta(seconds=60))  # git per example
def test_fuzz_git_log_names_and_messages(tmp_path_factory, commits: list) -> None:
    """Any file name or message bytes (git's separators, newlines, `@`): each of my commits with a subject
    gives one item, no other author's commit gives any, and nothing raises but a clean P2PError."""
    import subprocess

    from p2p_local.gitlog import git_items

    repo = tmp_path_factory.mktemp("repo")
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo)}
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "config", "user.email", "me@x.org"], check=True, env=env)
    mine = 0
    for i, (is_me, names, msg) in enumerate(commits):
        who = "me@x.org" if is_me else "bob@x.org"
        for n in names:
            p = repo / f"c{i}-{n}".replace("\n", "_") if n in (".", "..") or n.startswith(".git") else repo / n
            try:
                p.write_text("x")
            except OSError:
                assume(False)
        (repo.parent / f"{repo.name}.msg").write_text(msg or "-", encoding="utf-8")
        r = subprocess.run(["git", "-C", str(repo), "add", "-A"], env=env, capture_output=True)
        assume(r.returncode == 0)
        subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "--cleanup=verbatim", "-F",
                        str(repo.parent / f"{repo.name}.msg")], check=True, capture_output=True,
                       env={**env, "GIT_AUTHOR_NAME": who, "GIT_AUTHOR_EMAIL": who, "GIT_COMMITTER_NAME": who,
                            "GIT_COMMITTER_EMAIL": who})
        mine += is_me
    try:
        items, stats, _ = git_items(repo)
    except P2PError as e:
        clean(e)
        return
    assert stats["commits_read"] == len(commits) and not stats["commits_unreadable"]
    assert len(items) + stats["empty_subject_skipped"] == mine


@given(st.text(max_size=2000) | st.builds(lambda c, n: c * n, st.sampled_from(["a", "a.", "@a", "a-", "-by"]),
                                           st.integers(1, 50_000)))
def test_fuzz_scrub_is_linear_and_leaves_no_address(text: str) -> None:
    from p2p_local.gitlog import EMAIL, scrub

    out = scrub(text)
    assert EMAIL.search(out) is None


@given(st.text(max_size=40), st.text(max_size=12), st.text(max_size=8))
def test_fuzz_letterboxd_rows(tmp_path_factory, name: str, year: str, rating: str) -> None:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows([["Date", "Name", "Year", "Rating"], ["2023-01-01", name, year, rating]])
    path = tmp_path_factory.mktemp("lb") / "ratings.csv"
    try:
        path.write_text(buf.getvalue(), encoding="utf-8")
    except UnicodeEncodeError:
        assume(False)
    try:
        parsed = read_import(path, "letterboxd")
    except P2PError as e:
        clean(e)
        return
    for it in parsed.items:
        assert it.output in {"1", "2", "3", "4", "5"} and "\x00" not in it.input


@given(st.lists(st.from_regex(r"\A\w[\w.@+-]{0,20}\Z", fullmatch=True), min_size=2, max_size=6, unique=True))
def test_fuzz_export_names_are_safe_and_distinct(names: list[str]) -> None:
    import re

    from p2p_local.exports import export_name

    stems = [export_name(n, "commit-subject", None) for n in names]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) and not s.startswith(".") for s in stems)
    assert len({s.lower() for s in stems}) == len(stems)


BIDI_AND_SEPARATORS = set("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@given(st.text(max_size=300))
def test_fuzz_terminal_text_has_no_control_characters(text: str) -> None:
    """The one terminal rule: no control character (C0, C1, DEL) or bidi control reaches the terminal, whatever
    the text; `printable` keeps only line breaks and tabs; `json_text` is valid JSON of the same value."""
    import json
    import unicodedata

    from p2p_local.terminal import Printer, json_text, printable, shown

    def unsafe(c: str) -> bool:
        return unicodedata.category(c) == "Cc" or c in BIDI_AND_SEPARATORS

    assert not any(unsafe(c) for c in shown(text))
    assert not any(unsafe(c) and c not in "\n\t" for c in printable(text))
    dumped = json_text({"t": text})
    assert json.loads(dumped) == {"t": text} and not any(unsafe(c) for c in dumped)
    for cut in (0, len(text) // 3, len(text) // 2, len(text)):  # streamed in pieces: nothing unsafe either
        printer = Printer()
        out = printer.feed(text[:cut]) + printer.feed(text[cut:]) + printer.flush()
        assert not any(unsafe(c) and c not in "\n\t" for c in out)


@given(st.binary(max_size=300))
def test_fuzz_stdin_query(monkeypatch, data: bytes) -> None:
    import io
    import sys

    from p2p_local.commands.ask import query_text

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))
    try:
        text = query_text("-")
    except P2PError as e:
        clean(e)
        return
    assert text.strip() and not text.startswith("\ufeff")


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=4), v, max_size=3),
                            max_leaves=6)


def _card_with(tmp_path_factory, field: str, value: object):
    """The commit card with `field` set to `value`, as `--task-card` reads it: the card, or None after a clean
    refusal."""
    from p2p_local.data.format import TaskCard, builtin_card

    path = tmp_path_factory.mktemp("card") / "card.json"
    path.write_text(json.dumps(builtin_card("commit-subject").to_dict() | {field: value}))
    try:
        return TaskCard.load(path)
    except P2PError as e:
        clean(e)
        return None


@given(_json_values)
def test_fuzz_task_card_examples(tmp_path_factory, value: object) -> None:
    """A task card's `examples` (how many of the user's own items go before the query): a whole number 0-8,
    or a DataError."""
    card = _card_with(tmp_path_factory, "examples", value)
    assert card is None or (type(value) is int and 0 <= card.examples == value <= 8)


@given(st.sampled_from(["diff_chars", "examples_diff_chars"]), _json_values)
def test_fuzz_task_card_diff_fields(tmp_path_factory, field: str, value: object) -> None:
    """A card's diff budgets: a whole number 0-2000 (or null for the examples' one: the query's), or a DataError."""
    card = _card_with(tmp_path_factory, field, value)
    if card is not None:
        assert (value is None and field == "examples_diff_chars") or (type(value) is int and 0 <= value <= 2000)
        assert 0 <= card.example_diff_chars <= 2000


_diff_lines = st.lists(st.one_of(
    st.sampled_from(["diff --git a/x b/x", "diff --git a/poetry.lock b/poetry.lock", 'diff --git "a/t\\tb" "b/t\\tb"',
                     "index 1..2 100644", "--- a/x", "+++ b/x", "@@ -1,2 +3,4 @@ def f():", "@@ -0,0 +1 @@",
                     "new file mode 100644", "Binary files a/x and b/x differ", "\\ No newline at end of file", ""]),
    st.text(max_size=250).map(lambda t: t.replace("\n", " ")).flatmap(lambda t: st.sampled_from(["+", "-", " ", ""]).map(lambda p: p + t)),
), max_size=40)


@given(_diff_lines, st.integers(min_value=0, max_value=3000))
def test_fuzz_compact_diff(lines: list[str], budget: int) -> None:
    """Any text piped as a diff: the compact rule never raises, keeps within its budget, cuts lines at 200,
    is idempotent, and the commit query it makes says truthfully what was read."""
    from p2p_local import pipeline
    from p2p_local.data.format import builtin_card
    from p2p_local.diffs import compact_diff

    text = "\n".join(lines)
    d = compact_diff(text, budget)
    assert len(d.text) <= budget and all(len(ln) <= 200 for ln in d.text.split("\n"))
    assert compact_diff(d.text, budget).text == d.text
    card = builtin_card("commit-subject")
    req = pipeline.Request(card, "diff --git a/x b/x\n" + text)
    read = req.read
    assert read is not None and 0 <= read["diff_chars"] <= min(card.diff_chars, read["diff_chars_total"])
    assert 1 <= read["files"] <= read["files_total"] and req.query.startswith("files: ")
