"""The robustness catalogue: bad inputs through the real `p2p` CLI, each in its own process and data dir.

`python -m p2p_lab.robustness` (or `make robustness`) runs every case and writes
`reports/robustness.md` and `reports/robustness.json`. Each case copies one prepared template (a data dir
with a profile, its cached adapter, a previous profile export and adapter export beside it), runs one
`p2p ...` command in a subprocess with a timeout, and is classified:

- clean error: exit code != 0, an `error:` line and a hint (`hint:` or argparse's `usage:`);
- success: exit code 0;
- unclear error: exit code != 0 without both (counted, should stay 0);
- traceback: stderr holds "Traceback", or the CLI's guard reported an internal error (exit 70);
- abort: a negative return code (the process died from a signal: a GGML_ASSERT, a segfault);
- hang: the timeout passed;
- files lost: afterwards the store fails `PRAGMA integrity_check`, lost the profile or items, or a file that
  existed before (the previous exports) is gone or, when the command failed, changed.

The last four must be 0. Cases that need a full disk or a read-only directory run inside `unshare -m`
with a small tmpfs or a read-only bind mount (root in a container; elsewhere those cases are skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REPORT_MD = REPO / "reports" / "robustness.md"
REPORT_JSON = REPO / "reports" / "robustness.json"
COMMAND = "python -m p2p_lab.robustness"
CLASSES = ("adapters", "base models", "bundles", "imports", "profile names", "exports", "odd queries",
           "odd diffs", "CLI arguments", "hangs", "files destroyed", "injected data", "caught crashes", "concurrency",
           "export names", "stdin", "privacy", "bad values", "terminal output", "damaged store", "generated files",
           "forget race", "serve", "eval input", "chat templates")
PROFILE = "demo"
TASK = "movielens-rating"
QUERY = "Heat (1995) | Genres: Action|Crime|Thriller"
N_ITEMS = 40
INTERNAL_ERROR = 70

# Placeholders in a case's argv: {W} the case's work dir (beside the data dir), {H} the data dir.
Setup = Callable[["Ctx"], None]


@dataclass
class Case:
    cls: str
    name: str
    argv: list[str | bytes]
    setup: Setup | None = None
    stdin: bytes | None = None
    mount: str | None = None  # "full:<dir>" (a 64 KiB tmpfs over W/<dir>) or "ro:<dir>" (read-only bind)
    timeout: float = 90.0
    store_may_grow: bool = False  # a valid import may add items
    # What the command must have done beyond failing cleanly: returns "bad data accepted: ..." or
    # "wrong result: ..." (or None), given the case's dirs, exit code, stdout and stderr.
    check: Callable[[Ctx, int | None, str, str], str | None] | None = None
    shell: str | None = None  # a sh script instead of one command: "$P2P" is the CLI; {W} {H} filled in
    env: dict[str, str] = field(default_factory=dict)  # extra environment ({W} {H} filled in)
    stdin_write_only: bool = False  # stdin opened for writing only (a read fails with EBADF)
    store_checked: bool = True  # False where the case itself replaces or forgets the store's profile


@dataclass
class Ctx:
    home: Path
    work: Path
    models: Path


@dataclass
class Result:
    cls: str
    name: str
    outcome: str  # success | clean | unclear | traceback | abort | hang | skipped
    rc: int | None
    seconds: float
    lost: list[str] = field(default_factory=list)
    stderr_tail: str = ""
    wrong: str = ""  # "bad data accepted: ..." or "wrong result: ..." from the case's check


# --- the template ------------------------------------------------------------------------------------
def _env(home: Path, models: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("P2P_", "XDG_"))}
    env.update(P2P_HOME=str(home), P2P_MODELS=str(models), P2P_THREADS=os.environ.get("P2P_THREADS", "1"),
               HOME=str(tmp), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return env


def _p2p(env: dict[str, str], *argv: str, stdin: bytes | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", *argv], env=env, input=stdin,
                          capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"template step p2p {' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def real_models_dir() -> Path:
    from p2p_local.paths import models_dir

    return models_dir()


def build_template(root: Path, real_models: Path) -> Path:
    """A data dir with profile `demo` (40 rated movies), its cached adapter, and previous exports in keep/."""
    tpl = root / "template"
    home, work, tmp = tpl / "home", tpl / "work", tpl / "tmp"
    for d in (work / "keep", tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = _env(home, real_models, tmp)
    items = [{"input": f"Movie {i} ({1970 + i}) | Genres: {'Action|Crime' if i % 2 else 'Drama'}",
              "output": str(1 + i % 5), "time": 1.0e9 + 86400 * i,
              "meta": {"genres": ["Action", "Crime"] if i % 2 else ["Drama"]}} for i in range(N_ITEMS)]
    data = work / "ratings.jsonl"
    data.write_text(json.dumps({"user_id": "u1", "items": items}) + "\n")
    _p2p(env, "profile", "create", PROFILE, "--task", TASK)
    _p2p(env, "profile", "import", PROFILE, str(data))
    _p2p(env, "personalize", PROFILE)
    _p2p(env, "profile", "export", PROFILE, "-o", str(work / "keep" / "export.json"))
    _p2p(env, "adapter", "export", PROFILE, "--to", str(work / "keep" / "adapter"))
    return tpl


def _keep_hashes(work: Path) -> dict[str, str]:
    out = {}
    for p in sorted((work / "keep").rglob("*")):
        if p.is_file():
            out[str(p.relative_to(work))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _store_state(home: Path) -> tuple[str, int | None]:
    db = home / "p2p.sqlite3"
    if not db.is_file():
        return "missing", None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            ok = con.execute("PRAGMA integrity_check").fetchone()[0]
            row = con.execute("SELECT (SELECT COUNT(*) FROM items i WHERE i.profile_id = p.id) FROM profiles p"
                              " WHERE name = ?", (PROFILE,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"unreadable: {e}", None
    return ok, (row[0] if row else None)


# --- running one case ----------------------------------------------------------------------------------
def _fill(arg: str | bytes, ctx: Ctx) -> str | bytes:
    if isinstance(arg, bytes):
        return arg
    return arg.replace("{W}", str(ctx.work)).replace("{H}", str(ctx.home))


_UNSHARE = shutil.which("unshare")


def mounts_available() -> bool:
    if not _UNSHARE:
        return False
    try:
        return subprocess.run([_UNSHARE, "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _wrap(cmd: list[str | bytes], mount: str, ctx: Ctx) -> list[str | bytes]:
    kind, _, sub = mount.partition(":")
    target = ctx.work / sub
    if kind == "full":
        # A 64 KiB tmpfs holding what the folder held (a previous export), then filled to the last byte.
        script = ('set -e; t="$1"; shift; cp -a "$t" "$t.orig"; '
                  'mount -t tmpfs -o size=$(( $(du -sk "$t.orig" | cut -f1) + 64 ))k tmpfs "$t"; '
                  'cp -a "$t.orig/." "$t/"; (cat /dev/zero > "$t/.fill") 2>/dev/null || true; exec "$@"')
    elif kind == "ro":
        script = 'set -e; t="$1"; shift; mount --bind "$t" "$t"; mount -o remount,bind,ro "$t"; exec "$@"'
    else:
        raise ValueError(mount)
    return [_UNSHARE, "-m", "sh", "-c", script, "sh", str(target), *cmd]


def run_case(case: Case, template: Path, scratch: Path, real_models: Path, can_mount: bool) -> Result:
    root = Path(tempfile.mkdtemp(prefix="case-", dir=scratch))
    shutil.copytree(template, root, dirs_exist_ok=True, symlinks=True)
    ctx = Ctx(root / "home", root / "work", real_models)
    if case.mount and not can_mount:
        return Result(case.cls, case.name, "skipped", None, 0.0, stderr_tail="needs unshare -m and mount")
    _rehome(ctx)
    if case.setup:
        case.setup(ctx)
    keep = _keep_hashes(ctx.work)
    _, n_before = _store_state(ctx.home)
    cmd: list[str | bytes] = [sys.executable, "-m", "p2p_local.cli", *(_fill(a, ctx) for a in case.argv)]
    if case.shell is not None:
        cmd = ["sh", "-c", str(_fill(case.shell, ctx))]
    if case.stdin_write_only:
        cmd = ["sh", "-c", 'exec "$@" 0>>"$0"', str(ctx.work / "stdin-write-only"), *cmd]
    if case.mount:
        cmd = _wrap(cmd, case.mount, ctx)
    env = _env(ctx.home, ctx.models, root / "tmp")
    env["P2P"] = f"{sys.executable} -m p2p_local.cli"
    env.update({k: str(_fill(v, ctx)) for k, v in case.env.items()})
    home_before = _files_under(root / "tmp")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ctx.work, stdin=subprocess.PIPE if case.stdin is not None
                            else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out_b, err_b = proc.communicate(case.stdin, timeout=case.timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out_b, err_b = proc.communicate()
        rc = None
    seconds = time.perf_counter() - t0
    err = err_b.decode("utf-8", errors="replace")
    if rc is None:
        outcome = "hang"
    elif rc < 0:
        outcome = "abort"
    elif "Traceback" in err or rc == INTERNAL_ERROR:
        outcome = "traceback"
    elif rc == 0:
        outcome = "success"
    elif _clean(err) or (rc == 2 and out_b.decode("utf-8", errors="replace").startswith("usage:")):
        outcome = "clean"  # (`p2p` or `p2p profile` alone: the help, with the usage exit code)
    else:
        outcome = "unclear"
    lost = []
    after = _keep_hashes(ctx.work)
    for f, h in keep.items():
        if f not in after:
            lost.append(f"{f} is gone")
        elif after[f] != h and rc != 0:
            lost.append(f"{f} changed by a failed command")
    state, n_after = _store_state(ctx.home)
    if not case.store_checked:
        pass
    elif state != "ok":
        lost.append(f"store: {state}")
    elif n_after is None:
        lost.append(f"store: profile {PROFILE} is gone")
    elif n_after < (n_before or 0) or (n_after != n_before and not case.store_may_grow):
        lost.append(f"store: {PROFILE} has {n_after} items, had {n_before}")
    # Privacy, for every case: $HOME (and TMPDIR) hold nothing new afterwards.
    leaked = sorted(set(_files_under(root / "tmp")) - set(home_before))
    wrong = f"bad data accepted: wrote outside the data dir: {leaked[:3]}" if leaked else ""
    if case.check is not None and not wrong:
        try:
            wrong = case.check(ctx, rc, out_b.decode("utf-8", errors="replace"), err) or ""
        except Exception as e:  # a check that cannot run says so, as a wrong result
            wrong = f"wrong result: the check failed ({type(e).__name__}: {e})"
    shutil.rmtree(root, ignore_errors=True)
    return Result(case.cls, case.name, outcome, rc, seconds, lost, err[-600:], wrong)


def _files_under(d: Path) -> list[str]:
    """Everything under `d`, with size and mtime: a file rewritten in place counts as new too."""
    if not d.is_dir():
        return []
    return [f"{p.relative_to(d)} ({st.st_size} B, {st.st_mtime_ns})" for p in d.rglob("*")
            if (st := p.lstat()) is not None]


def _clean(err: str) -> bool:
    lines = err.splitlines()
    has_error = any(ln.startswith("error:") or ": error:" in ln for ln in lines)
    has_hint = any("hint:" in ln or ln.startswith("usage:") for ln in lines)
    return has_error and has_hint


# --- building bad files -----------------------------------------------------------------------------------
def _cached_adapter(ctx: Ctx) -> Path:
    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        return Path(con.execute("SELECT path FROM adapters ORDER BY id DESC LIMIT 1").fetchone()[0])
    finally:
        con.close()


def _rehome(ctx: Ctx) -> None:
    """The copied store names the template's adapter paths: point them at this case's copy."""
    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        for rid, p in con.execute("SELECT id, path FROM adapters").fetchall():
            rel = Path(p).relative_to(Path(p).parents[2])  # adapters/profile-N/file.gguf
            con.execute("UPDATE adapters SET path = ? WHERE id = ?", (str(ctx.home / rel), rid))
        con.commit()
    finally:
        con.close()


def _trust(ctx: Ctx, path: Path) -> None:
    """Record the planted file's sha256, as if this app had written it (the checksum passes; only the
    validator stands between the file and llama.cpp)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        con.execute("UPDATE adapters SET sha256 = ? WHERE path = ?", (digest, str(path)))
        con.commit()
    finally:
        con.close()


def write_raw_adapter(path: Path, tensors: dict[str, tuple[np.ndarray, np.ndarray]], *, alpha=16.0,
                      arch="gemma3", base_sha="", rank=None, alpha_as_int=False, extra=None,
                      general_type="adapter", kv=None) -> Path:
    """An adapter written with gguf directly, bypassing our writer's checks: files it never would write
    (`extra`: tensors as they are, by name; `kv`: {key: (gguf type, value)}, e.g. {KEY_LORA_ALPHA: ("int32", 4)})."""
    import gguf

    from p2p_local import adapter as A

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(A.KEY_GENERAL_TYPE, general_type)
    w.add_string(A.KEY_ADAPTER_TYPE, "lora")
    if alpha is not None:
        (w.add_uint32 if alpha_as_int else w.add_float32)(A.KEY_LORA_ALPHA, alpha)
    if base_sha:
        w.add_string(A.KEY_BASE_SHA256, base_sha)
    if rank is not None:
        w.add_uint32(A.KEY_RANK, rank)
    for key, (kind, value) in (kv or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    for name in sorted(tensors):
        a, b = tensors[name]
        if a is not None:
            w.add_tensor(name + A.SUFFIX_A, a)
        if b is not None:
            w.add_tensor(name + A.SUFFIX_B, b)
    for n, t in (extra or {}).items():
        w.add_tensor(n, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _good_tensors(ctx: Ctx) -> tuple[dict, float, str]:
    from p2p_local.adapter import read_adapter

    ad = read_adapter(_cached_adapter(ctx))
    tensors = {k: (a.astype(np.float16), b.astype(np.float16)) for k, (a, b) in ad.tensors.items()}
    return tensors, ad.alpha, str(ad.meta.get("p2p.base.sha256", ""))


# What stands where a file should be and is none: every reader must refuse it before opening (a FIFO blocks the
# open, /dev/zero never ends, a folder fails deep inside a parser).
ODD_FILES: dict[str, Callable[[Path], object]] = {
    "directory": Path.mkdir, "fifo": os.mkfifo, "dev-zero": lambda p: p.symlink_to("/dev/zero"),
    "dangling": lambda p: p.symlink_to(p.with_name("nowhere")),
}


def _adapter_mutation(kind: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        from p2p_local.adapter import parse_tensor_name, tensor_name

        path = _cached_adapter(ctx)
        good = path.read_bytes()
        t, alpha, sha = _good_tensors(ctx)
        first = sorted(t)[0]
        a0, b0 = t[first]
        r = a0.shape[0]
        path.unlink()
        if kind == "junk":
            path.write_bytes(os.urandom(4096))
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind.startswith("truncated-"):
            frac = int(kind.split("-")[1]) / 100
            path.write_bytes(good[: int(len(good) * frac)])
        elif kind == "magic-only":
            path.write_bytes(b"GGUF\x03\x00\x00\x00")
        elif kind == "huge-counts":
            path.write_bytes(b"GGUF\x03\x00\x00\x00" + (2**62).to_bytes(8, "little") * 2)
        elif kind == "flipped-bytes":
            b = bytearray(good)
            for i in range(64, len(b), max(1, len(b) // 97)):
                b[i] ^= 0xFF
            path.write_bytes(bytes(b))
        elif kind.removesuffix("-link") in ODD_FILES:
            ODD_FILES[kind.removesuffix("-link")](path)
        else:
            tensors = dict(t)
            kw: dict = {"alpha": alpha, "base_sha": sha}
            if kind == "wrong-shape-a":
                tensors[first] = (np.zeros((r, a0.shape[1] + 1), np.float16), b0)
            elif kind == "wrong-shape-b":
                tensors[first] = (a0, np.zeros((b0.shape[0] * 2, r), np.float16))
            elif kind == "transposed":
                tensors[first] = (np.ascontiguousarray(a0.T), np.ascontiguousarray(b0.T))
            elif kind == "rank-0":
                tensors = {k: (np.zeros((0, a.shape[1]), np.float16), np.zeros((b.shape[0], 0), np.float16))
                           for k, (a, b) in t.items()}
            elif kind == "rank-mismatch":
                tensors[first] = (np.zeros((r + 1, a0.shape[1]), np.float16), np.zeros((b0.shape[0], r + 1),
                                                                                       np.float16))
            elif kind == "nan":
                a = a0.copy()
                a[0, 0] = np.nan
                tensors[first] = (a, b0)
            elif kind == "inf":
                b = b0.copy()
                b[-1, -1] = np.inf
                tensors[first] = (a0, b)
            elif kind == "3d-a":
                tensors[first] = (a0.reshape(1, *a0.shape), b0)
            elif kind == "1d-b":
                tensors[first] = (a0, b0.reshape(-1))
            elif kind == "f64":
                tensors = {k: (a.astype(np.float64), b.astype(np.float64)) for k, (a, b) in t.items()}
            elif kind == "int32":
                tensors = {k: (a.astype(np.int32), b.astype(np.int32)) for k, (a, b) in t.items()}
            elif kind == "missing-b":
                tensors[first] = (a0, None)
            elif kind == "unknown-target":
                tensors[tensor_name(0, "attn_zzz")] = (a0, b0)
            elif kind == "layer-out-of-range":
                tensors[tensor_name(999, parse_tensor_name(first)[1])] = (a0, b0)
            elif kind == "non-lora-tensor":
                kw["extra"] = {"token_embd.weight": np.zeros((4, 4), np.float16)}
            elif kind == "no-tensors":
                tensors = {}
            elif kind == "alpha-nan":
                kw["alpha"] = float("nan")
            elif kind == "alpha-negative":
                kw["alpha"] = -8.0
            elif kind == "alpha-missing":
                kw["alpha"] = None
            elif kind == "alpha-int":
                kw.update(alpha=16, alpha_as_int=True)
            elif kind == "wrong-arch":
                kw["arch"] = "llama"
            elif kind == "other-base":
                kw["base_sha"] = "0" * 64
            elif kind == "huge-values":
                tensors[first] = (np.full_like(a0, 60000), np.full_like(b0, 60000))
            elif kind == "alpha-1e30":
                kw["alpha"] = 1e30
            elif kind == "weights-x1e5":
                tensors = {k: (a * np.float16(1e4), b * np.float16(10)) for k, (a, b) in tensors.items()}
            else:
                raise ValueError(kind)
            write_raw_adapter(path, tensors, **kw)
        _trust(ctx, path)
    return setup


ADAPTER_KINDS = ("junk", "empty", "truncated-10", "truncated-50", "truncated-99", "magic-only", "huge-counts",
                 "flipped-bytes", "directory", "fifo", "dev-zero-link", "dangling-link", "wrong-shape-a",
                 "wrong-shape-b", "transposed", "rank-0", "rank-mismatch", "nan", "inf", "3d-a", "1d-b", "f64",
                 "int32", "missing-b", "unknown-target", "layer-out-of-range", "non-lora-tensor", "no-tensors",
                 "alpha-nan", "alpha-negative", "alpha-missing", "alpha-int", "wrong-arch", "other-base",
                 "huge-values", "alpha-1e30", "weights-x1e5")


def _adapter_cases() -> list[Case]:
    cases = []
    for i, kind in enumerate(ADAPTER_KINDS):
        setup = _adapter_mutation(kind)
        cases.append(Case("adapters", f"{kind} cached adapter -> ask",
                          ["ask", QUERY, "--profile", PROFILE, "--task", TASK], setup))
        if i % 6 == 0:
            cases.append(Case("adapters", f"{kind} cached adapter -> personalize", ["personalize", PROFILE],
                              setup))
        elif i % 6 == 3:
            cases.append(Case("adapters", f"{kind} cached adapter -> adapter export",
                              ["adapter", "export", PROFILE, "--to", "{W}/out"], setup))
    return cases


# --- base models ------------------------------------------------------------------------------------------
def _models_copy(ctx: Ctx) -> None:
    """A private models dir (links to the real files) so `models add` writes nowhere shared."""
    own = ctx.work / "models"
    own.mkdir()
    for p in ctx.models.iterdir():
        (own / p.name).symlink_to(p)
    ctx.models = own


def _gguf_base(path: Path, *, block_count: int | None = 0, arch: str = "gemma3", tensors: bool = True,
               kv_only: bool = False) -> None:
    import gguf

    from p2p_local.adapter import tensor_name

    w = gguf.GGUFWriter(str(path), arch)
    if block_count is not None:
        w.add_block_count(block_count)
    if not kv_only:
        w.add_context_length(128)
        w.add_embedding_length(8)
        w.add_feed_forward_length(16)
        w.add_head_count(1)
    if tensors:
        w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
        if block_count:
            for i in range(block_count):
                w.add_tensor(tensor_name(i, "attn_q"), np.zeros((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _base_file(kind: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        _models_copy(ctx)
        f = ctx.work / "base.gguf"
        real = next(p for p in ctx.models.iterdir() if p.name.endswith(".gguf"))
        if kind == "junk":
            f.write_bytes(os.urandom(1 << 16))
        elif kind == "empty":
            f.write_bytes(b"")
        elif kind == "text":
            f.write_text("this is not a model\n" * 100)
        elif kind.startswith("truncated-"):
            n = int(kind.split("-")[1])
            with open(real, "rb") as src:
                f.write_bytes(src.read(n))
        elif kind == "magic-only":
            f.write_bytes(b"GGUF\x03\x00\x00\x00")
        elif kind == "huge-counts":
            f.write_bytes(b"GGUF\x03\x00\x00\x00" + (2**62).to_bytes(8, "little") * 2)
        elif kind == "block-count-0":
            _gguf_base(f, block_count=0)
        elif kind == "no-block-count":
            _gguf_base(f, block_count=None)
        elif kind == "block-count-huge":
            _gguf_base(f, block_count=2, kv_only=True)
        elif kind == "no-tensors":
            _gguf_base(f, block_count=2, tensors=False)
        elif kind == "unknown-arch":
            _gguf_base(f, block_count=1, arch="zzzarch")
        elif kind == "two-layers-missing-weights":
            _gguf_base(f, block_count=2)
        elif kind in ODD_FILES:
            ODD_FILES[kind](f)
        elif kind == "sparse-huge":
            with open(f, "wb") as h:
                h.truncate(200 << 30)
        elif kind == "missing":
            pass
        else:
            raise ValueError(kind)
    return setup


BASE_KINDS = ("junk", "empty", "text", "truncated-4", "truncated-100000", "truncated-5000000", "magic-only",
              "huge-counts", "block-count-0", "no-block-count", "block-count-huge", "no-tensors", "unknown-arch",
              "two-layers-missing-weights", "directory", "fifo", "dev-zero", "sparse-huge", "missing")


def _damaged_default(kind: str) -> Setup:
    """The prepared default base replaced (in this case's models dir) by a damaged copy."""
    def setup(ctx: Ctx) -> None:
        _models_copy(ctx)
        real = next(p for p in ctx.models.iterdir() if p.name.endswith(".gguf"))
        src = real.resolve()
        real.unlink()
        if kind == "truncated":
            with open(src, "rb") as s:
                real.write_bytes(s.read(1 << 20))
        elif kind == "junk":
            real.write_bytes(os.urandom(1 << 16))
        elif kind == "missing":
            pass
        elif kind == "block-count-0":
            _gguf_base(real, block_count=0)
        elif kind == "directory":
            real.mkdir()
        else:
            raise ValueError(kind)
    return setup


def _base_cases() -> list[Case]:
    cases = [Case("base models", f"models add {k}", ["models", "add", "{W}/base.gguf", "--name", "mine"],
                  _base_file(k), timeout=120) for k in BASE_KINDS]
    for name in ("../evil", "a/b", "", "x\ny", ".hidden", "gemma3-270m", "x" * 80):
        cases.append(Case("base models", f"models add name {name[:12]!r}",
                          ["models", "add", "{W}/base.gguf", "--name", name], _base_file("junk")))
    # (a missing default base is re-assembled from its package: 250 MB per case, left out)
    for kind in ("truncated", "junk", "block-count-0", "directory"):
        cases.append(Case("base models", f"default base {kind} -> ask --base",
                          ["ask", QUERY, "--base", "--task", TASK], _damaged_default(kind), timeout=120))
    cases.append(Case("base models", "default base truncated -> personalize", ["personalize", PROFILE, "--force"],
                      _damaged_default("truncated"), timeout=120))
    return cases


# --- bundles ----------------------------------------------------------------------------------------------
def _shipped_bundle() -> Path:
    from p2p_local.bundle import DEFAULT_BUNDLE, find_bundle

    return find_bundle(DEFAULT_BUNDLE)


def _set(d: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        d.pop(keys[-1], None)
    else:
        d[keys[-1]] = value


_DELETE = object()


def _bundle(change: str | None = None, value=None, *, raw: bytes | None = None, onnx: str | None = None) -> Setup:
    def setup(ctx: Ctx) -> None:
        src = _shipped_bundle()
        d = ctx.work / "bundle"
        d.mkdir()
        for f in src.iterdir():
            if f.name != "manifest.json" and not (onnx and f.name == "hypernet.onnx"):
                (d / f.name).symlink_to(f)
        manifest = json.loads((src / "manifest.json").read_text())
        if change:
            _set(manifest, change, value)
        (d / "manifest.json").write_bytes(raw if raw is not None else json.dumps(manifest).encode())
        if onnx == "missing":
            pass
        elif onnx == "junk":
            (d / "hypernet.onnx").write_bytes(os.urandom(4096))
        elif onnx == "truncated":
            (d / "hypernet.onnx").write_bytes((src / "hypernet.onnx").read_bytes()[:100_000])
        elif onnx == "empty":
            (d / "hypernet.onnx").write_bytes(b"")
        elif onnx == "directory":
            (d / "hypernet.onnx").mkdir()
        elif onnx == "fifo":
            os.mkfifo(d / "hypernet.onnx")
    return setup


def _bundle_cases() -> list[Case]:
    argv = ["personalize", PROFILE, "--force", "--bundle", "{W}/bundle"]
    changes = [
        ("format", "nope"), ("format_version", "1"), ("format_version", None),
        ("lora.rank", "8"), ("lora.rank", 0), ("lora.rank", -1), ("lora.rank", None), ("lora.rank", 2**70),
        ("lora.alpha", "x"), ("lora.alpha", None), ("lora.alpha", float("inf")),
        ("lora.targets", None), ("lora.targets", []), ("lora.targets", [1]), ("lora.targets", "attn_q"),
        ("lora.shapes", None), ("lora.shapes", {}), ("lora.shapes", []), ("lora.layers", ["a"]),
        ("lora.layers", [999]), ("lora.layers", None), ("feature_dim", None),
        ("feature_dim", "x"), ("feature_dim", -1), ("feature_dim", _DELETE),
        ("onnx", None), ("onnx", "hypernet.onnx"), ("onnx.file", None), ("onnx.file", 5),
        ("onnx.file", "../../../../etc/passwd"), ("onnx.file", "/dev/zero"), ("onnx.file", ""),
        ("onnx.sha256", "0" * 64), ("lora", _DELETE), ("lora", []),
    ]
    cases = [Case("bundles", f"manifest {path} = {value!r}"[:70] if value is not _DELETE else f"manifest {path} removed",
                  argv, _bundle(path, value)) for path, value in changes]
    for name, raw in (("manifest not JSON", b"{"), ("manifest a list", b"[]"), ("manifest empty", b""),
                      ("manifest deep nesting", b"[" * 100_000), ("manifest invalid UTF-8", b'{"format": "\xff"}'),
                      ("manifest NaN", b'{"format": NaN}')):
        cases.append(Case("bundles", name, argv, _bundle(raw=raw)))
    for onnx in ("missing", "junk", "truncated", "empty", "directory", "fifo"):
        cases.append(Case("bundles", f"hypernet.onnx {onnx}", argv, _bundle(onnx=onnx)))
    cases.append(Case("bundles", "bundle dir missing", ["personalize", PROFILE, "--bundle", "{W}/nope"]))
    cases.append(Case("bundles", "bundle is a file", ["personalize", PROFILE, "--bundle", "{W}/keep/export.json"]))
    return cases


# --- imports ----------------------------------------------------------------------------------------------
def _item(inp="Movie X (1999) | Genres: Drama", out="4", t=1.0e9) -> dict:
    return {"input": inp, "output": out, "time": t}


def _file(name: str, content: bytes | Callable[[Path], None]) -> Setup:
    def setup(ctx: Ctx) -> None:
        p = ctx.work / name
        if callable(content):
            content(p)
        else:
            p.write_bytes(content)
    return setup


def _jsonl(*items: dict | str) -> bytes:
    its = [i for i in items]
    return (json.dumps({"user_id": "u", "items": its}, allow_nan=True) + "\n").encode()


def _import_cases() -> list[Case]:
    argv = ["profile", "import", PROFILE, "{W}/in.jsonl"]
    big = "x" * (2 << 20)
    files: list[tuple[str, bytes | Callable[[Path], None]]] = [
        ("oversize input field", _jsonl(_item(inp=big))),
        ("oversize output field", _jsonl(_item(out=big))),
        ("10 MB line", _jsonl(*[_item(inp="y" * 100_000) for _ in range(100)])),
        ("deep JSON nesting", b'{"user_id": "u", "items": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n"),
        ("deep meta nesting", _jsonl({**_item(), "meta": json.loads("[" * 500 + "]" * 500)})),
        ("huge int time", b'{"user_id": "u", "items": [{"input": "a", "output": "4", "time": 1' + b"0" * 5000
         + b"}]}\n"),
        ("huge int rating", _jsonl(_item(out=10**400))),
        ("inf time", _jsonl(_item(t=float("inf")))),
        ("-inf time", _jsonl(_item(t=float("-inf")))),
        ("NaN time", _jsonl(_item(t=float("nan")))),
        ("1e300 time", _jsonl(_item(t=1e300))),
        ("time as string", _jsonl(_item(t="yesterday"))),
        ("time as list", _jsonl(_item(t=[1]))),
        ("rating 0", _jsonl(_item(out="0"))),
        ("rating 99", _jsonl(_item(out="99"))),
        ("rating -1", _jsonl(_item(out="-1"))),
        ("rating abc", _jsonl(_item(out="abc"))),
        ("rating null", _jsonl(_item(out=None))),
        ("rating NaN", _jsonl(_item(out=float("nan")))),
        ("lone surrogate input", b'{"user_id": "u", "items": [{"input": "a\\ud800b", "output": "4"}]}\n'),
        ("lone surrogate user", b'{"user_id": "\\udfff", "items": [{"input": "a", "output": "4"}]}\n'),
        ("invalid UTF-8", b'{"user_id": "u", "items": [{"input": "\xff\xfe\xc3", "output": "4"}]}\n'),
        ("NUL bytes", b'{"user_id": "u", "items": [{"input": "a\x00b", "output": "4"}]}\n'),
        ("escaped NUL", b'{"user_id": "u", "items": [{"input": "a\\u0000b", "output": "4"}]}\n'),
        ("binary junk", os.urandom(65536)),
        ("empty file", b""),
        ("whitespace only", b"\n\n   \n"),
        ("top-level string", b'"hello"\n'),
        ("top-level number", b"12345\n"),
        ("items not a list", b'{"user_id": "u", "items": {"a": 1}}\n'),
        ("item not an object", b'{"user_id": "u", "items": [5, "x", null]}\n'),
        ("meta not an object", _jsonl({**_item(), "meta": [1, 2]})),
        ("missing input", _jsonl({"output": "4"})),
        ("input a number", _jsonl(_item(inp=5))),
        ("duplicate keys", b'{"user_id": "u", "items": [{"input": "a", "input": "b", "output": "4"}]}\n'),
        ("100k items", _jsonl(*[_item(inp=f"M{i}") for i in range(100_000)])),
        ("BOM", b"\xef\xbb\xbf" + _jsonl(_item())),
        ("CRLF + trailing garbage", _jsonl(_item()).replace(b"\n", b"\r\n") + b"}}}"),
        ("sparse 5 GB file", lambda p: open(p, "wb").truncate(5 << 30)),
        ("FIFO", ODD_FILES["fifo"]),
        ("/dev/zero", ODD_FILES["dev-zero"]),
        ("/dev/urandom", lambda p: p.symlink_to("/dev/urandom")),
        ("directory", ODD_FILES["directory"]),
        ("dangling symlink", ODD_FILES["dangling"]),
        ("unreadable (mode 000)", lambda p: (p.write_bytes(_jsonl(_item())), p.chmod(0))),
    ]
    cases = [Case("imports", n, argv, _file("in.jsonl", c), store_may_grow=True, timeout=120) for n, c in files]
    csv_files = [
        ("CSV missing columns", b"a,b\n1,2\n"),
        ("CSV 10k columns", (",".join(f"c{i}" for i in range(10_000)) + "\n").encode() * 3),
        ("CSV huge field", b"userId,movieId,rating,timestamp\n1,1,4," + b"9" * 2_000_000 + b"\n"),
        ("CSV rating out of range", b"userId,movieId,rating,timestamp\n1,1,42,964982703\n"),
        ("CSV rating inf", b"userId,movieId,rating,timestamp\n1,1,inf,964982703\n"),
        ("CSV time inf", b"userId,movieId,rating,timestamp\n1,1,4,inf\n"),
        ("CSV time 1e400", b"userId,movieId,rating,timestamp\n1,1,4,1e400\n"),
        ("CSV unterminated quote", b'userId,movieId,rating,timestamp\n1,"1,4,964982703\n'),
        ("CSV invalid UTF-8", b"userId,movieId,rating,timestamp\n\xff\xfe,1,4,964982703\n"),
    ]
    cases += [Case("imports", n, ["profile", "import", PROFILE, "{W}/in.csv"], _file("in.csv", c),
                   store_may_grow=True, timeout=120) for n, c in csv_files]
    cases.append(Case("imports", "missing file", argv))
    cases.append(Case("imports", "stdin /dev/zero via -", ["profile", "import", PROFILE, "/dev/stdin"],
                      stdin=b"\x00" * (1 << 20)))
    cases.append(Case("imports", "--format json on JSONL", ["profile", "import", PROFILE, "{W}/in.jsonl",
                                                           "--format", "json"], _file("in.jsonl", _jsonl(_item())),
                      store_may_grow=True))
    cases.append(Case("imports", "--user unknown", argv + ["--user", "nobody"], _file("in.jsonl", _jsonl(_item()))))
    cases.append(Case("imports", "--git not a repo", ["profile", "import", PROFILE, "--git", "{W}/keep"]))
    return cases


# --- profile names ----------------------------------------------------------------------------------------
NAMES = ["a\nb", "alice\n", "a/b", "../x", "/etc", "", " ", "\t", "x" * 65, "a b", "-", ".", "..", ".hidden",
         "💥", "a;rm -rf", "é" * 70, "\u202eevil", "con:", "a\\b"]


def _name_cases() -> list[Case]:
    cases = []
    for i, n in enumerate(NAMES):
        label = repr(n[:12])
        cases.append(Case("profile names", f"create {label}", ["profile", "create", n, "--task", TASK]))
        if i % 2:
            cases.append(Case("profile names", f"show {label}", ["profile", "show", n]))
        else:
            cases.append(Case("profile names", f"import --create {label}",
                              ["profile", "import", n, "{W}/in.jsonl", "--create"], _file("in.jsonl", _jsonl(_item()))))
    for n in ("a\nb", "../x", ""):
        cases.append(Case("profile names", f"personalize {n!r}", ["personalize", n]))
        cases.append(Case("profile names", f"forget {n!r}", ["profile", "forget", n, "--yes"]))
        cases.append(Case("profile names", f"ask --profile {n!r}", ["ask", QUERY, "--profile", n]))
    return cases


# --- exports ----------------------------------------------------------------------------------------------
def _export_cases() -> list[Case]:
    keep = "{W}/keep/export.json"
    c = [
        ("profile export to a directory", ["profile", "export", PROFILE, "-o", "{W}/keep"], None),
        ("profile export missing parent", ["profile", "export", PROFILE, "-o", "{W}/no/such/dir/x.json"], None),
        ("profile export to /dev/full", ["profile", "export", PROFILE, "-o", "/dev/full"], None),
        ("profile export to /proc", ["profile", "export", PROFILE, "-o", "/proc/p2p-x.json"], None),
        ("profile export over a FIFO", ["profile", "export", PROFILE, "-o", "{W}/fifo"],
         lambda ctx: os.mkfifo(ctx.work / "fifo")),
        ("profile export through a file as parent", ["profile", "export", PROFILE, "-o", keep + "/x.json"], None),
        ("profile export --mode 999", ["profile", "export", PROFILE, "-o", keep, "--mode", "999"], None),
        ("profile export --mode abc", ["profile", "export", PROFILE, "-o", keep, "--mode", "abc"], None),
        ("profile export --mode 7777", ["profile", "export", PROFILE, "-o", keep, "--mode", "7777"], None),
        ("profile export unknown profile over keep", ["profile", "export", "ghost", "-o", keep], None),
        ("adapter export to a file", ["adapter", "export", PROFILE, "--to", keep], None),
        ("adapter export to /dev/null", ["adapter", "export", PROFILE, "--to", "/dev/null"], None),
        ("adapter export missing parent", ["adapter", "export", PROFILE, "--to", "{W}/a/b/c"], None),
        ("adapter export --mode 999", ["adapter", "export", PROFILE, "--to", "{W}/out", "--mode", "999"], None),
        ("adapter export --format peft to a file", ["adapter", "export", PROFILE, "--to", keep, "--format", "peft"],
         None),
        ("personalize --peft-out a file", ["personalize", PROFILE, "--peft-out", keep], None),
        ("personalize --peft-out /dev/full", ["personalize", PROFILE, "--peft-out", "/dev/full"], None),
    ]
    cases = [Case("exports", n, a, s) for n, a, s in c]
    mounted = [
        ("profile export over keep, full disk", ["profile", "export", PROFILE, "-o", keep], "full:keep"),
        ("profile export new file, full disk", ["profile", "export", PROFILE, "-o", "{W}/keep/new.json"], "full:keep"),
        ("adapter export over keep, full disk", ["adapter", "export", PROFILE, "--to", "{W}/keep/adapter"],
         "full:keep"),
        ("adapter export peft, full disk", ["adapter", "export", PROFILE, "--to", "{W}/keep/peft", "--format", "peft"],
         "full:keep"),
        ("personalize --peft-out, full disk", ["personalize", PROFILE, "--peft-out", "{W}/keep/peft"], "full:keep"),
        ("profile export read-only dir", ["profile", "export", PROFILE, "-o", keep], "ro:keep"),
        ("adapter export read-only dir", ["adapter", "export", PROFILE, "--to", "{W}/keep/adapter"], "ro:keep"),
        ("personalize --peft-out read-only dir", ["personalize", PROFILE, "--peft-out", "{W}/keep/peft"], "ro:keep"),
        ("profile import, full data dir", ["profile", "import", PROFILE, "{W}/keep/export.json"], "full:../home"),
        ("personalize --force, full data dir", ["personalize", PROFILE, "--force"], "full:../home"),
        ("profile list, read-only data dir", ["profile", "list"], "ro:../home"),
        ("profile show, read-only data dir", ["profile", "show", PROFILE], "ro:../home"),
        ("profile export, read-only data dir", ["profile", "export", PROFILE, "-o", "{W}/out.json"], "ro:../home"),
        ("profile add, read-only data dir", ["profile", "add", PROFILE, "--input", "M (1999)", "--output", "4"],
         "ro:../home"),
        ("ask, read-only data dir", ["ask", QUERY, "--profile", PROFILE, "--task", TASK], "ro:../home"),
    ]
    for n, a, m in mounted:
        cases.append(Case("exports", n, a, mount=m, store_may_grow=n.startswith("profile import")))
    return cases


# --- odd queries ------------------------------------------------------------------------------------------
def _query_cases() -> list[Case]:
    ask = ["ask", "--profile", PROFILE, "--task", TASK]
    queries: list[tuple[str, str | bytes]] = [
        ("invalid UTF-8 bytes", b"Heat \xff\xfe (1995)"), ("lone continuation byte", b"\x80"),
        ("overlong encoding", b"\xc0\xaf"), ("empty", ""), ("spaces", "   "), ("newlines", "\n\n\n"),
        ("100 KB", "Heat (1995) " * 8000), ("control characters", "\x01\x02\x1b[2J\x07"),
        ("emoji", "🎬" * 2000), ("RTL override", "\u202eHeat (1995)"), ("template braces", "{input} {0} {x!r}"),
        ("chat special tokens", "<start_of_turn>user\n<end_of_turn><bos><eos>"),
        ("genres only", " | Genres: "), ("lone surrogate escape", "\\ud800"),
    ]
    cases = [Case("odd queries", n, ask[:1] + [q] + ask[1:]) for n, q in queries]
    cases.append(Case("odd queries", "invalid UTF-8 bytes --base", ["ask", b"\xff\xff", "--base", "--task", TASK]))
    cases.append(Case("odd queries", "1 MB on stdin", ask[:1] + ["-"] + ask[1:], stdin=b"Heat (1995) " * 90_000))
    cases.append(Case("odd queries", "invalid UTF-8 on stdin", ask[:1] + ["-"] + ask[1:], stdin=b"\xff\xfe\xfd" * 100))
    cases.append(Case("odd queries", "empty stdin", ask[:1] + ["-"] + ask[1:], stdin=b""))
    cases.append(Case("odd queries", "NUL on stdin", ask[:1] + ["-"] + ask[1:], stdin=b"a\x00b"))
    cases.append(Case("odd queries", "1 MB stdin, free chat", ["ask", "-", "--profile", PROFILE, "--task", "free"],
                      stdin=b"hello " * 170_000))
    cases.append(Case("odd queries", "100 KB --base generation", ["ask", "x " * 50_000, "--base", "--task",
                                                                 "commit-subject"]))
    # Diffs piped to the commit task (the compact rule reads them: p2p_local/diffs.py)
    commit = ["ask", "-", "--base", "--task", "commit-subject", "--candidates", "3"]
    head = b"diff --git a/x b/x\n"
    cases.append(Case("odd diffs", "4 MB one-line diff", commit, stdin=head + b"+" + b"y" * (4 << 20)))
    cases.append(Case("odd diffs", "20,000 files", commit,
                      stdin=b"".join(b"diff --git a/f%d b/f%d\n+x\n" % (i, i) for i in range(20_000))))
    cases.append(Case("odd diffs", "headers only", commit, stdin=head * 3 + b"index 1..2\n--- a/x\n+++ b/x\n"))
    cases.append(Case("odd diffs", "quoted names, ESC and NUL", commit,
                      stdin=b'diff --git "a/t\\tb" "b/t\\tb"\n+\x1b[2J\x00\n-\x07\n'))
    cases.append(Case("odd diffs", "invalid UTF-8 in a diff", commit, stdin=head + b"+\xff\xfe\n"))
    return cases


# --- CLI arguments ----------------------------------------------------------------------------------------
def _arg_cases() -> list[Case]:
    ask = ["ask", QUERY, "--profile", PROFILE, "--task", TASK]
    argvs = {
        "--scale nan": ask + ["--scale", "nan"], "--scale inf": ask + ["--scale", "inf"],
        "--scale -1": ask + ["--scale", "-1"], "--scale 3": ask + ["--scale", "3"],
        "--scale abc": ask + ["--scale", "abc"], "--scale 1e309": ask + ["--scale", "1e309"],
        "--temperature nan": ask + ["--temperature", "nan"], "--temperature -1": ask + ["--temperature", "-1"],
        "--temperature 1e30": ask + ["--temperature", "1e30"],
        "--max-tokens 0": ask + ["--max-tokens", "0"], "--max-tokens -5": ask + ["--max-tokens", "-5"],
        "--max-tokens 1e9": ask + ["--max-tokens", "1000000000"],
        "--candidates 0": ask + ["--candidates", "0"], "--candidates 9": ask + ["--candidates", "9"],
        "--candidates abc": ask + ["--candidates", "abc"], "--candidates 10**30": ask + ["--candidates", "1" + "0" * 30],
        "--items -1": ["profile", "show", PROFILE, "--items", "-1"],
        "--items abc": ["profile", "show", PROFILE, "--items", "abc"],
        "--items 10**30": ["profile", "show", PROFILE, "--items", "1" + "0" * 30],
        "--items 5000 digits": ["profile", "show", PROFILE, "--items", "9" * 5000],
        "ask unknown task": ["ask", QUERY, "--task", "no-such-task"],
        "ask task path": ["ask", QUERY, "--task", "../../etc/passwd"],
        "personalize unknown task": ["personalize", PROFILE, "--task", "no-such-task"],
        "create unknown task": ["profile", "create", "bob", "--task", "no such task"],
        "unknown subcommand": ["frobnicate"], "no arguments": [], "profile alone": ["profile"],
        "unknown option": ["ask", QUERY, "--frob"], "ask without text": ["ask"],
        "edit item 0": ["profile", "edit", PROFILE, "0", "--output", "1"],
        "edit item 2**70": ["profile", "edit", PROFILE, str(2**70), "--output", "1"],
        "history item -1": ["profile", "history", PROFILE, "-1"],
        "add --time inf": ["profile", "add", PROFILE, "--input", "M (1999)", "--output", "4", "--time", "inf"],
        "add --time garbage": ["profile", "add", PROFILE, "--input", "M (1999)", "--output", "4", "--time", "soon"],
        "add --meta not JSON": ["profile", "add", PROFILE, "--input", "M", "--output", "4", "--meta", "{"],
        "add --meta list": ["profile", "add", PROFILE, "--input", "M", "--output", "4", "--meta", "[1]"],
        "add --meta deep": ["profile", "add", PROFILE, "--input", "M", "--output", "4", "--meta", "[" * 50000],
        "forget without --yes": ["profile", "forget", PROFILE],
        "models prepare unknown": ["models", "prepare", "no-such-model"],
        "chat unknown profile": ["chat", "--profile", "ghost"],
        "ask --model unknown": ["ask", "hi", "--model", "no-such-model"],
        "ask --model a path": ["ask", "hi", "--model", "../../etc/passwd"],
        "ask --model a base (no chat template)": ["ask", "hi", "--model", "gemma3-270m"],
        "ask --model with a task": ["ask", QUERY, "--model", "no-such-model", "--task", TASK],
        "chat --model unknown": ["chat", "--model", "no-such-model"],
        "chat unknown task": ["chat", "--profile", PROFILE, "--task", "no-such-task"],
        "hook run missing file": ["hook", "run", "{W}/nope", "--profile", PROFILE],
        "eval unknown task": ["eval", "--task", "no-such-task"],
        "data stats bad flag": ["data", "stats", "--frob"],
    }
    return [Case("CLI arguments", n, a, timeout=120, store_may_grow=n.startswith("add ")) for n, a in argvs.items()]


# --- the surfaces of issue 19: git import, exports, stdin, the hook, Letterboxd, dry runs, privacy ----------
ME = "me@example.org"


def _git_repo(commits: list[tuple[str, dict[str, str], str | bytes]]) -> Setup:
    """{W}/repo with commits (author e-mail, files, message; a message of bytes goes through a file)."""
    def setup(ctx: Ctx) -> None:
        r = ctx.work / "repo"
        r.mkdir()
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(ctx.work)}

        def git(*args: str, who: str = ME) -> None:
            subprocess.run(["git", "-C", str(r), *args], check=True, capture_output=True,
                           env={**env, "GIT_AUTHOR_NAME": who, "GIT_AUTHOR_EMAIL": who, "GIT_COMMITTER_NAME": who,
                                "GIT_COMMITTER_EMAIL": who})
        git("init", "-q", "-b", "main")
        git("config", "user.email", ME)
        for who, files, msg in commits:
            for name, text in files.items():
                (r / name).parent.mkdir(parents=True, exist_ok=True)
                (r / name).write_text(text)
            git("add", "-A", who=who)
            (ctx.work / "msg").write_bytes(msg if isinstance(msg, bytes) else msg.encode())
            git("commit", "-q", "--allow-empty", "-F", str(ctx.work / "msg"), who=who)
    return setup


def _git_items(ctx: Ctx) -> list[tuple[str, str]]:
    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        return con.execute("SELECT input, output FROM items WHERE task = 'commit-subject' ORDER BY id").fetchall()
    finally:
        con.close()


def _expect_items(outputs: list[str]) -> Callable[[Ctx, int | None, str, str], str | None]:
    def check(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
        got = [o for _, o in _git_items(ctx)]
        return None if got == outputs else f"bad data accepted: items {got[:4]}, expected {outputs}"
    return check


def _still(kind: str, rel: str) -> Callable[[Ctx, int | None, str, str], str | None]:
    """The special file at {W}/rel is still a FIFO / device / link afterwards."""
    import stat as st

    def check(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
        p = ctx.work / rel
        ok = {"fifo": lambda: st.S_ISFIFO(os.lstat(p).st_mode), "device": lambda: st.S_ISCHR(os.lstat(p).st_mode),
              "link": lambda: p.is_symlink()}[kind]()
        return None if ok and rc != 0 else f"bad data accepted: {rel} was replaced by a file (rc {rc})"
    return check


def _special(rel: str, kind: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        import stat as st

        p = ctx.work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "device":
            os.mknod(p, st.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own (root in a container)
        elif kind == "link":
            os.mkfifo(ctx.work / "a-fifo")
            p.symlink_to(ctx.work / "a-fifo")
        else:
            os.mkfifo(p)
    return setup


def _user_files(rel: str) -> Setup:
    """A folder of the user's own files in keep/ (hashed: replacing it counts as files lost)."""
    def setup(ctx: Ctx) -> None:
        d = ctx.work / "keep" / rel
        d.mkdir(parents=True)
        (d / "README.md").write_text("my own notes\n")
    return setup


def _no_file(rel: str, what: str) -> Callable[[Ctx, int | None, str, str], str | None]:
    def check(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
        return f"bad data accepted: {what}" if (ctx.work / rel).exists() else None
    return check


def _private_modes(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    bad = [f"{p.relative_to(ctx.home)} {p.stat().st_mode & 0o777:o}" for p in [ctx.home, *ctx.home.rglob("*")]
           if p.stat().st_mode & 0o777 != (0o700 if p.is_dir() else 0o600)]
    return f"bad data accepted: not private: {bad[:4]}" if bad else None


def _issue19_cases() -> list[Case]:
    imp_git = ["profile", "import", PROFILE, "--git", "{W}/repo", "--author", ME]
    word = "w" * 1_000_000
    cases = [
        # hangs
        Case("hangs", "git import: one 1 MB word in the subject and body", imp_git,
             _git_repo([(ME, {"a.py": "1"}, f"Fix {word}\n\n{word}@x")]), timeout=60, store_may_grow=True,
             check=lambda ctx, rc, o, e: None if len(_git_items(ctx)) == 1 else "wrong result: not one item"),
        Case("hangs", "git import: 1 MB of '@a' pairs", imp_git, _git_repo([(ME, {"a.py": "1"}, "S\n\n" + "@a" * 500_000)]),
             timeout=60, store_may_grow=True),
        Case("hangs", "git import: 600k-character trailer key", imp_git,
             _git_repo([(ME, {"a.py": "1"}, "S\n\n" + "a-" * 300_000 + "by: x")]), timeout=60, store_may_grow=True),
        Case("hangs", "chat without a terminal", ["chat", "--profile", PROFILE], timeout=30),
        Case("hangs", "chat with stdin from a pipe", ["chat"], stdin=b"hello\n", timeout=30),
        # files destroyed
        Case("files destroyed", "profile export -o a device node", ["profile", "export", PROFILE, "-o", "{W}/dev"],
             _special("dev", "device"), check=_still("device", "dev")),
        Case("files destroyed", "profile export -o a link to a FIFO", ["profile", "export", PROFILE, "-o", "{W}/ln"],
             _special("ln", "link"), check=_still("link", "ln")),
        Case("files destroyed", "adapter export over a FIFO", ["adapter", "export", PROFILE, "--to", "{W}/out"],
             _special("out/demo-movielens-rating.gguf", "fifo"), check=_still("fifo", "out/demo-movielens-rating.gguf")),
        Case("files destroyed", "adapter export README over a device node",
             ["adapter", "export", PROFILE, "--to", "{W}/out"], _special("out/demo-movielens-rating.README.md", "device"),
             check=_still("device", "out/demo-movielens-rating.README.md")),
        Case("files destroyed", "adapter export Modelfile over a link to a FIFO",
             ["adapter", "export", PROFILE, "--to", "{W}/out"], _special("out/demo-movielens-rating.Modelfile", "link"),
             check=_still("link", "out/demo-movielens-rating.Modelfile")),
        Case("files destroyed", "adapter export --to a device node", ["adapter", "export", PROFILE, "--to", "{W}/dev"],
             _special("dev", "device"), check=_still("device", "dev")),
        Case("files destroyed", "adapter export --format peft over the user's folder",
             ["adapter", "export", PROFILE, "--to", "{W}/keep", "--format", "peft"],
             _user_files("demo-movielens-rating")),
        Case("files destroyed", "personalize --peft-out the user's folder",
             ["personalize", PROFILE, "--peft-out", "{W}/keep/mine"], _user_files("mine")),
        # injected data
        Case("injected data", "another author's file names spell an item by me",
             imp_git, _git_repo([(ME, {"a.py": "1"}, "Add a"),
                                 ("bob@example.org", {n: "x" for n in ["\x1e" + "0" * 40, "a", "b", ME, "n",
                                                                       "o chosen subject", "p"]}, "Bob's commit")]),
             store_may_grow=True, check=_expect_items(["Add a"])),
        Case("injected data", "my commit with separators in names and body is one item",
             imp_git, _git_repo([(ME, {"x\x1ey": "1", "\nlead": "2", "tab\tname": "3"}, "Odd names\n\nbody \x1e\x1f")]),
             store_may_grow=True, check=_expect_items(["Odd names"])),
        Case("injected data", "a subject holding NUL-like escapes and a newline",
             imp_git, _git_repo([(ME, {"a.py": "1"}, "One line\x1d\x1c\n\nbody")]), store_may_grow=True,
             check=_expect_items(["One line"])),
        # caught crashes
        Case("caught crashes", "Letterboxd year '199\u00b2'", ["profile", "import", PROFILE, "{W}/ratings.csv"],
             _file("ratings.csv", "Date,Name,Year,Rating\n2023-01-01,Heat,199\u00b2,4\n".encode())),
        Case("caught crashes", "Letterboxd year of 5000 digits", ["profile", "import", PROFILE, "{W}/ratings.csv"],
             _file("ratings.csv", ("Date,Name,Year,Rating\n2023-01-01,Heat," + "9" * 5000 + ",4\n").encode())),
        Case("caught crashes", "store file of random bytes", ["profile", "show", PROFILE],
             lambda ctx: (ctx.home / "p2p.sqlite3").write_bytes(os.urandom(1 << 16)), store_checked=False),
        Case("caught crashes", "store of random bytes after a SQLite header", ["personalize", PROFILE],
             lambda ctx: (ctx.home / "p2p.sqlite3").write_bytes(b"SQLite format 3\x00" + os.urandom(1 << 16)),
             store_checked=False),
        Case("caught crashes", "ask - with stdin opened write-only", ["ask", "-", "--profile", PROFILE],
             stdin_write_only=True),
        Case("caught crashes", "hook install over a foreign hook, read-only hooks folder",
             ["hook", "install", "--repo", "{W}/repo", "--profile", PROFILE],
             lambda ctx: (_git_repo([(ME, {"a": "1"}, "A")])(ctx),
                          (ctx.work / "repo/.git/hooks/prepare-commit-msg").write_text("#!/bin/sh\necho mine\n")),
             mount="ro:repo/.git/hooks",
             check=lambda ctx, rc, o, e: None if (ctx.work / "repo/.git/hooks/prepare-commit-msg").read_text()
             == "#!/bin/sh\necho mine\n" else "bad data accepted: the foreign hook changed"),
        # concurrency and interruption
        Case("concurrency", "two imports of one file at once",
             [], _file("in.jsonl", _jsonl(*[_item(inp=f"M{i} (1999) | Genres: Drama") for i in range(2000)])),
             shell='$P2P profile import twin {W}/in.jsonl --create --task movielens-rating & p=$!; '
                   '$P2P profile import twin {W}/in.jsonl --create --task movielens-rating; a=$?; wait $p; b=$?; '
                   '[ $a -eq 0 ] && exit $b; exit $a',
             check=lambda ctx, rc, o, e: _count_items(ctx, "twin", 2000)),
        Case("concurrency", "two git imports of one repository at once", [],
             _git_repo([(ME, {f"f{i}.py": "1"}, f"Commit {i}") for i in range(30)]),
             shell='$P2P profile import g --git {W}/repo --create & p=$!; $P2P profile import g --git {W}/repo '
                   '--create; a=$?; wait $p; b=$?; [ $a -eq 0 ] && exit $b; exit $a',
             check=lambda ctx, rc, o, e: _count_items(ctx, "g", 30)),
        Case("concurrency", "import --create that fails leaves no profile",
             ["profile", "import", "newbie", "{W}/in.jsonl", "--create", "--task", TASK],
             _file("in.jsonl", _jsonl(_item(), _item(out="99"))),
             check=lambda ctx, rc, o, e: _count_items(ctx, "newbie", None)),
        Case("concurrency", "--dry-run on a new machine", ["profile", "import", "x", "{W}/in.jsonl", "--create",
                                                           "--dry-run"], _file("in.jsonl", _jsonl(_item())),
             env={"P2P_HOME": "{W}/fresh"}, check=_no_file("fresh", "the dry run created the data dir")),
        Case("concurrency", "git --dry-run on a new machine", imp_git + ["--create", "--dry-run"],
             _git_repo([(ME, {"a.py": "1"}, "Add a")]), env={"P2P_HOME": "{W}/fresh"},
             check=_no_file("fresh", "the dry run created the data dir")),
        # export names and README commands
        Case("export names", "two non-Latin profiles export to one folder", [],
             _file("in.jsonl", _jsonl(*[_item(inp=f"M{i} (1999) | Genres: Drama") for i in range(10)])),
             shell="$P2P profile import \u0410\u043b\u0438\u0441\u0430 {W}/in.jsonl --create --task movielens-rating && "
                   "$P2P profile import \u0411\u043e\u0440\u0438\u0441 {W}/in.jsonl --create --task movielens-rating && "
                   "$P2P adapter export \u0410\u043b\u0438\u0441\u0430 --to {W}/out && "
                   "$P2P adapter export \u0411\u043e\u0440\u0438\u0441 --to {W}/out",
             timeout=180, check=lambda ctx, rc, o, e: None if len(list((ctx.work / "out").glob("*.gguf"))) == 2
             else "wrong result: the second export replaced the first"),
        Case("export names", "README commands quoted for a folder with spaces and $(...)",
             ["adapter", "export", PROFILE, "--to", "{W}/a b $(touch PWNED)"],
             check=lambda ctx, rc, o, e: _readme_quoted(ctx)),
        # stdin
        Case("stdin", "UTF-8 BOM before a diff (commit task)", ["ask", "-", "--task", "commit-subject", "--base",
                                                                "--json"],
             stdin=b"\xef\xbb\xbfdiff --git a/src/app.py b/src/app.py\n--- a/src/app.py\n+++ b/src/app.py\n@@ -1 +1 @@\n-a\n+b\n",
             check=lambda ctx, rc, o, e: None if json.loads(o)["query"].startswith("files: src/app.py")
             else f"wrong result: the diff was not read ({json.loads(o)['query'][:40]!r})"),
        Case("stdin", "50 MB of text on stdin", ["ask", "-", "--profile", PROFILE, "--task", TASK],
             stdin=b"Heat (1995) " * 4_400_000, timeout=60),
        Case("stdin", "50 MB diff on stdin (commit task)", ["ask", "-", "--task", "commit-subject", "--base"],
             stdin=(b"diff --git a/x.py b/x.py\n" + b"+" + b"y" * 1000 + b"\n") * 50_000, timeout=120),
        # privacy
        Case("privacy", "personalize writes nothing outside the data dir, all private",
             ["personalize", PROFILE, "--force"], check=_private_modes),
        Case("privacy", "a crash log is private", ["profile", "show", PROFILE],
             lambda ctx: (ctx.home / "logs").mkdir(mode=0o755), check=_private_modes),
        Case("privacy", "forget removes the profile's exports", [],
             shell=f"$P2P adapter export {PROFILE} --to {{H}}/exports --query 'secret query' && "
                   f"$P2P profile forget {PROFILE} --yes", store_checked=False,
             check=lambda ctx, rc, o, e: None if not any((ctx.home / "exports").iterdir())
             else f"bad data accepted: exports left: {[p.name for p in (ctx.home / 'exports').iterdir()]}"),
        Case("privacy", "profile show strips escape sequences", [],
             shell="$P2P profile add demo --input \"$(printf 'Movie (1999) | Genres: Drama\\033]0;pwned\\007')\" "
                   "--output 4 && $P2P profile show demo", store_may_grow=True,
             check=lambda ctx, rc, o, e: "bad data accepted: escape sequences printed" if "\x1b" in o or "\x07" in o
             else None),
        # bad values
        Case("bad values", "--temperature 3", ["ask", QUERY, "--profile", PROFILE, "--temperature", "3"]),
        Case("bad values", "--max-tokens 100000", ["ask", QUERY, "--profile", PROFILE, "--max-tokens", "100000"]),
        Case("bad values", "hook install unknown profile", ["hook", "install", "--repo", "{W}/repo", "--profile",
                                                            "ghost"], _git_repo([(ME, {"a": "1"}, "A")]),
             check=_no_file("repo/.git/hooks/prepare-commit-msg", "a hook for an unknown profile")),
        Case("bad values", "hook install unknown task", ["hook", "install", "--repo", "{W}/repo", "--profile", PROFILE,
                                                         "--task", "nope"], _git_repo([(ME, {"a": "1"}, "A")]),
             check=_no_file("repo/.git/hooks/prepare-commit-msg", "a hook for an unknown task")),
        Case("bad values", "Letterboxd NUL in a name", ["profile", "import", PROFILE, "{W}/ratings.csv"],
             _file("ratings.csv", b"Date,Name,Year,Rating\n2023-01-01,He\x00at,1995,4\n")),
        Case("bad values", "Letterboxd rating 1e-300", ["profile", "import", PROFILE, "{W}/ratings.csv"],
             _file("ratings.csv", b"Date,Name,Year,Rating\n2023-01-01,Heat,1995,1e-300\n")),
        Case("bad values", "Letterboxd rating 4.25", ["profile", "import", PROFILE, "{W}/ratings.csv"],
             _file("ratings.csv", b"Date,Name,Year,Rating\n2023-01-01,Heat,1995,4.25\n")),
        Case("bad values", "bundle alpha 1e30", ["personalize", PROFILE, "--force", "--bundle", "{W}/bundle"],
             _bundle("lora.alpha", 1e30)),
    ]
    for kind in ("alpha-1e30", "weights-x1e5"):
        # personalize (no query): the planted file is the cached adapter it would use as it is
        cases.append(Case("bad values", f"{kind} cached adapter -> personalize", ["personalize", PROFILE],
                          _adapter_mutation(kind), check=_adapter_refused))
    return cases


def _count_items(ctx: Ctx, profile: str, want: int | None) -> str | None:
    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        row = con.execute("SELECT (SELECT COUNT(*) FROM items WHERE profile_id = p.id) FROM profiles p WHERE name = ?",
                          (profile,)).fetchone()
    finally:
        con.close()
    got = row[0] if row else None
    return None if got == want else f"bad data accepted: {profile} holds {got} items, expected {want}"


def _readme_quoted(ctx: Ctx) -> str | None:
    import shlex

    readme = next((ctx.work / "a b $(touch PWNED)").glob("*.README.md"))
    gguf = readme.with_name(readme.name.replace(".README.md", ".gguf"))
    return None if f"--lora {shlex.quote(str(gguf))} " in readme.read_text() else "wrong result: paths unquoted"


def _adapter_refused(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    """The planted adapter must not be what answered: refused and regenerated (the file is replaced)."""
    from p2p_local.adapter import MAX_LORA_SCALE, MAX_LORA_VALUE

    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        paths = [Path(r[0]) for r in con.execute("SELECT path FROM adapters").fetchall()]
    finally:
        con.close()
    from p2p_local.adapter import read_adapter

    for p in paths:
        if p.is_file():
            ad = read_adapter(p)
            big = max(float(np.abs(x).max()) for pair in ad.tensors.values() for x in pair)
            if ad.alpha / ad.rank > MAX_LORA_SCALE or big > MAX_LORA_VALUE:
                return f"bad data accepted: the insane adapter {p.name} is still cached (rc {rc})"
    return None


# --- issue 28: what reaches the terminal, a damaged store, paths in generated files, forget racing ask ------
HOSTILE = "fix \x1b[2Jthe\x1b]0;pwned\x07 bug\x9b31m in\rparser\x08s\u202eoof"  # CSI, OSC, C1, CR, BS, RLO
UNSAFE_OUT = ("\x1b", "\x07", "\x9b", "\r", "\x08", "\u202e")


def _hostile_item(ctx: Ctx) -> None:
    from p2p_local.store import Store

    with Store(ctx.home / "p2p.sqlite3") as st:
        st.profiles.add_item(PROFILE, None, f"{HOSTILE} (1999) | Genres: Drama", "4", time=2.0e9)


def _no_unsafe_output(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    bad = [repr(c) for c in UNSAFE_OUT if c in out]
    return f"wrong result: {', '.join(bad)} reached stdout" if bad else None


def _damage(kind: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        import random

        db = ctx.home / "p2p.sqlite3"
        con = sqlite3.connect(db)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        for extra in ("-wal", "-shm"):
            Path(str(db) + extra).unlink(missing_ok=True)
        r, data = random.Random(kind), bytearray(db.read_bytes())
        if kind == "random bytes":
            data = bytearray(r.randbytes(8192))
        elif kind == "header + random pages":
            data = bytearray(b"SQLite format 3\x00" + r.randbytes(8192))
        elif kind == "cut to a third":
            data = data[: len(data) // 3]
        else:  # "pages overwritten N": a few random runs of bytes
            for _ in range(6):
                at = r.randrange(len(data))
                data[at:at + 512] = r.randbytes(512)
        db.write_bytes(bytes(data))
    return setup


def _store_error(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    return None if rc in (0, 7) else f"wrong result: exit {rc}, not 0 or the store's 7"


def _nothing_at(rel: str) -> Callable[[Ctx, int | None, str, str], str | None]:
    def check(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
        return f"bad data accepted: {rel!r} was written" if (ctx.work / rel).exists() else None
    return check


def _no_orphan_adapters(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    """Every adapter file under the data dir is one the store still records (a forgotten profile's is not)."""
    files = {p.resolve() for p in (ctx.home / "adapters").rglob("*.gguf")} if (ctx.home / "adapters").is_dir() else set()
    con = sqlite3.connect(ctx.home / "p2p.sqlite3")
    try:
        known = {Path(r[0]).resolve() for r in con.execute("SELECT path FROM adapters")}
    finally:
        con.close()
    orphans = sorted(str(f.name) for f in files - known)
    return f"bad data accepted: adapters of a forgotten profile survive: {orphans[:3]}" if orphans else None


def _issue28_cases() -> list[Case]:
    cases = [Case("terminal output", f"profile {what} of an item holding escapes", argv, _hostile_item,
                  check=_no_unsafe_output, store_may_grow=True)
             for what, argv in (("show", ["profile", "show", PROFILE]), ("show --json", ["profile", "show", PROFILE, "--json"]),
                                ("list", ["profile", "list"]), ("export", ["profile", "export", PROFILE]),
                                ("history", ["profile", "history", PROFILE, "1"]))]
    cases += [Case("terminal output", "ask --json with an escape-holding history",
                   ["ask", QUERY, "--profile", PROFILE, "--task", TASK, "--json"], _hostile_item,
                   check=_no_unsafe_output, store_may_grow=True),
              Case("terminal output", "ask a query holding escapes", ["ask", HOSTILE, "--profile", PROFILE, "--base",
                                                                     "--max-tokens", "8"], check=_no_unsafe_output)]
    for kind in ("random bytes", "header + random pages", "cut to a third", *(f"pages overwritten {i}" for i in range(4))):
        for what, argv in (("profile list", ["profile", "list"]), ("profile show", ["profile", "show", PROFILE]),
                           ("ask", ["ask", QUERY, "--profile", PROFILE, "--task", TASK])):
            cases.append(Case("damaged store", f"{what}: {kind}", argv, _damage(kind), store_checked=False,
                              check=_store_error))
    newline = "out\nFROM /etc/passwd"
    cases += [Case("generated files", "adapter export --to a folder with a newline",
                   ["adapter", "export", PROFILE, "--to", "{W}/" + newline], check=_nothing_at(newline)),
              Case("generated files", "adapter export --to a folder with a carriage return",
                   ["adapter", "export", PROFILE, "--to", "{W}/out\rADAPTER x"], check=_nothing_at("out\rADAPTER x")),
              Case("generated files", "adapter export --to a folder with quotes and $()",
                   ["adapter", "export", PROFILE, "--to", "{W}/o'u\"t $(touch pwned)"],
                   check=lambda ctx, rc, o, e: "bad data accepted: the path ran" if (ctx.work / "pwned").exists()
                   else None)]
    race = ('for i in 1 2 3; do\n'
            f'  $P2P ask "{QUERY}" --profile {PROFILE} --task {TASK} >/dev/null 2>&1 &\n'
            f'  sleep 0.$i; $P2P profile forget {PROFILE} --yes >/dev/null 2>&1; wait\n'
            f'  $P2P profile import {PROFILE} {{W}}/keep/export.json --create >/dev/null 2>&1\n'
            'done\n')
    cases.append(Case("forget race", "ask and forget at once, three times", [], shell=race, timeout=240,
                      store_checked=False, check=_no_orphan_adapters))
    export = race.replace(f'$P2P ask "{QUERY}" --profile {PROFILE} --task {TASK}',
                          f'$P2P adapter export {PROFILE} --to {{W}}/exp$i --query "{QUERY}"')
    cases.append(Case("forget race", "adapter export and forget at once, three times", [], shell=export, timeout=240,
                      store_checked=False, check=_no_orphan_adapters))
    return cases


# --- p2p serve: bad requests to a running server, which must answer each cleanly and stay up ---------------
SERVE_SCRIPT = """$P2P serve --port 0 2>{W}/serve.log &
pid=$!
i=0
until port=$(sed -n 's|.*listening on http://[^:]*:\\([0-9]*\\)/v1.*|\\1|p' {W}/serve.log | head -1) && [ -n "$port" ]; do
  sleep 0.3; i=$((i+1)); [ $i -gt 300 ] && { kill $pid; echo "no server"; exit 9; }
done
%s
curl -s -o /dev/null -w 'after %%{http_code}\\n' "localhost:$port/v1/models"
kill -TERM $pid; wait $pid; echo "server exit $?"
"""


def _serve_ok(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    """Every bad request got a 4xx with an OpenAI error body, the server still answered after, and it shut
    down cleanly on SIGTERM, its log free of tracebacks."""
    log = (ctx.work / "serve.log").read_text(errors="replace") if (ctx.work / "serve.log").is_file() else ""
    codes = [ln.split()[1] for ln in out.splitlines() if ln.startswith("code ")]
    if not codes or not all(c.startswith("4") for c in codes):
        return f"wrong result: a bad request was answered {codes}"
    if '"error"' not in out:
        return "wrong result: no OpenAI error body"
    if "after 200" not in out:
        return "wrong result: the server did not answer after the bad request"
    # uvicorn shuts down, then ends by the signal it caught (143 = 128 + SIGTERM): both are a clean stop.
    if not ("server exit 0" in out or "server exit 143" in out) or "closed" not in log or "Traceback" in log:
        return f"wrong result: the server did not stop cleanly ({out.splitlines()[-1:]}; {log[-200:]!r})"
    return None


def _serve_cases() -> list[Case]:
    code = "curl -s -w '\\ncode %%{http_code}\\n' "
    post = code + "localhost:$port/v1/chat/completions -H 'Content-Type: application/json' %s; echo"
    get = code + "%s localhost:$port/v1/models; echo"  # a valid request: only the header makes it bad
    bad = {
        "bad JSON": post % "-d '{\"model\": '",
        "a 2 MB body": post % "--data-binary @{W}/big.json",
        "wrong types": post % "-d '{\"model\": 5, \"messages\": \"hi\", \"max_tokens\": -3}'",
        "an unknown profile": post % ("-d '{\"model\": \"p2p/ghost/movielens-rating\", \"messages\": "
                                      "[{\"role\": \"user\", \"content\": \"x\"}]}'"),
        "max_tokens past the bound": post % ("-d '{\"model\": \"p2p/base\", \"max_tokens\": 1000000, \"messages\": "
                                             "[{\"role\": \"user\", \"content\": \"x\"}]}'"),
        "a rebinding Host header": get % "-H 'Host: evil.example'",
        "a cross-site Origin": get % "-H 'Origin: http://evil.example'",
    }

    def big(ctx: Ctx) -> None:
        (ctx.work / "big.json").write_text('{"model": "p2p/base", "prompt": "' + "x" * (2 << 20) + '"}')

    return [Case("serve", f"serve: {name}", [], big if "2 MB" in name else None,
                 shell=SERVE_SCRIPT % request, timeout=120, check=_serve_ok) for name, request in bad.items()]


# --- p2p eval --data / --task-card, and a registered model's chat template: untrusted files ---------------
CARD = {"name": "mine", "kind": "rating", "template": "Item: {input}\nRating: ", "description": "how a user rates items",
        "labels": ["1", "2", "3", "4", "5"]}


def _users(n: int = 6, **item: object) -> list[dict]:
    return [{"user_id": f"u{u}", "items": [{"input": f"item {i}", "output": str(1 + (u + i) % 5), "time": 1.0e9 + i, **item}
                                           for i in range(6)]} for u in range(n)]


def _eval_files(card: dict | str | None = None, users: list | str | None = None, special: str = "") -> Setup:
    def setup(ctx: Ctx) -> None:
        c = json.dumps(CARD) if card is None else card if isinstance(card, str) else json.dumps(card)
        (ctx.work / "card.json").write_text(c)
        data = ctx.work / "users.jsonl"
        if special == "fifo":
            os.mkfifo(data)
        elif special == "dev-zero":
            data.symlink_to("/dev/zero")
        elif special == "folder":
            data.mkdir()
        else:
            rows = _users() if users is None else users
            data.write_text(rows if isinstance(rows, str) else "".join(json.dumps(u) + "\n" for u in rows))
    return setup


def _refused(ctx: Ctx, rc: int | None, out: str, err: str) -> str | None:
    return "bad data accepted: the command succeeded" if rc == 0 else None


def _eval_input_cases() -> list[Case]:
    argv = ["eval", "--data", "{W}/users.jsonl", "--task-card", "{W}/card.json", "--task", "mine", "--split", "all",
            "--methods", "user-mean", "--out", "{W}/out", "--bootstrap", "20"]
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    dup = _users()
    dup[1]["user_id"] = dup[0]["user_id"]
    bad = {
        "card labels a number": _eval_files({**CARD, "labels": 5}),
        "card value_range text": _eval_files({**CARD, "value_range": "ab"}),
        "card template with a format spec": _eval_files({**CARD, "template": "{input:>999999999}"}),
        "card nested 100k deep": _eval_files("[" * 100_000 + "]" * 100_000),
        "users file a FIFO": _eval_files(special="fifo"),
        "users file /dev/zero": _eval_files(special="dev-zero"),
        "users file a folder": _eval_files(special="folder"),
        "a 400-digit time": _eval_files(users='{"user_id": "u", "items": [{"input": "a", "output": "3", "time": '
                                              + "9" * 400 + "}]}\n"),
        "a NaN time": _eval_files(users='{"user_id": "u", "items": [{"input": "a", "output": "3", "time": NaN}]}\n'),
        "meta nested 100 deep": _eval_files(users=_users(meta=deep)),
        "duplicate user ids": _eval_files(users=dup),
        "an output outside the labels": _eval_files(users=_users(output="7")),
    }
    return [Case("eval input", f"eval: {name}", argv, setup, timeout=60, check=_refused) for name, setup in bad.items()]


def _hostile_model(template: str) -> Setup:
    def setup(ctx: Ctx) -> None:
        import gguf
        from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

        _models_copy(ctx)  # an add that wrongly succeeds writes into the case's own models dir, not the shared one
        src = ctx.models / "SmolLM2-135M-Instruct.Q4_1.gguf"
        reader = gguf.GGUFReader(str(src), "r")
        writer = gguf.GGUFWriter(str(ctx.work / "hostile.gguf"), arch=reader.fields["general.architecture"].contents())
        copy_with_new_metadata(reader, writer, {"tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING,
                                                                                           template)}, [])
    return setup


def _chat_template_cases() -> list[Case]:
    argv = ["models", "add", "{W}/hostile.gguf", "--name", "evil"]
    templates = {
        "nested endless loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x",
        "a 10 GB string": "{{ 'x' * 10000000000 }}",
        "a syntax error": "{% for m in messages %}{{ m.content }",
        "no text": "{% if false %}x{% endif %}",
    }
    return [Case("chat templates", f"models add: {name}", argv, _hostile_model(t), timeout=120, check=_refused)
            for name, t in templates.items()]


def catalogue() -> list[Case]:
    return (_adapter_cases() + _base_cases() + _bundle_cases() + _import_cases() + _name_cases() + _export_cases()
            + _query_cases() + _arg_cases() + _issue19_cases() + _issue28_cases() + _serve_cases()
            + _eval_input_cases() + _chat_template_cases())


def sample(cases: list[Case], per_class: int) -> list[Case]:
    """The first `per_class` cases of each class, then every ~nth so the sample spreads over the class."""
    out = []
    for cls in CLASSES:
        mine = [c for c in cases if c.cls == cls]
        step = max(1, len(mine) // per_class)
        out += mine[::step][:per_class]
    return out


# --- run and report ---------------------------------------------------------------------------------------
COLUMNS = ("tried", "clean", "success", "unclear", "traceback", "abort", "hang", "files lost", "bad data accepted",
           "wrong result", "skipped")


def tally(results: list[Result]) -> dict[str, dict[str, int]]:
    table = {cls: dict.fromkeys(COLUMNS, 0) for cls in CLASSES}
    for r in results:
        row = table[r.cls]
        if r.outcome == "skipped":
            row["skipped"] += 1
            continue
        row["tried"] += 1
        row[r.outcome] += 1
        row["files lost"] += bool(r.lost)
        row["bad data accepted"] += r.wrong.startswith("bad data")
        row["wrong result"] += r.wrong.startswith("wrong result")
    table["total"] = {k: sum(table[c][k] for c in CLASSES) for k in COLUMNS}
    return table


def bad(results: list[Result]) -> list[Result]:
    return [r for r in results if r.outcome in ("traceback", "abort", "hang") or r.lost or r.wrong]


def run(cases: list[Case], jobs: int = 2, progress: bool = False) -> list[Result]:
    real = real_models_dir()
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in real.rglob("*") if p.is_file()}
    with tempfile.TemporaryDirectory(prefix="p2p-robustness-") as tmp:
        scratch = Path(tmp)
        template = build_template(scratch, real)
        can_mount = mounts_available()
        results: list[Result] = []

        def one(case: Case) -> Result:
            r = run_case(case, template, scratch, real, can_mount)
            if progress:
                flag = "" if r.outcome in ("clean", "success", "skipped") and not r.lost and not r.wrong else "   <-- !"
                print(f"[{r.cls}] {r.name}: {r.outcome} rc={r.rc} {r.seconds:.1f}s{flag}", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(one, cases))
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in real.rglob("*") if p.is_file()}
    if before != after:
        changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
        results.append(Result("base models", "the shared models dir is untouched", "success", 0, 0.0,
                              [f"shared models dir changed: {changed}"]))
    return results


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def previous_results(exclude: list[str]) -> tuple[list[Result], str] | None:
    """The cases of the last full report outside `exclude`, and where they come from (commit, date)."""
    if not REPORT_JSON.is_file():
        return None
    old = json.loads(REPORT_JSON.read_text())
    fields = {f.name for f in dataclasses.fields(Result)}
    kept = [Result(**{k: v for k, v in c.items() if k in fields}) for c in old["cases"] if c["cls"] not in exclude]
    return kept, f"commit {old.get('commit')}, {old.get('date')}"


def write_report(results: list[Result], seconds: float, jobs: int,
                 partial: tuple[list[str], str] | None = None) -> None:
    table = tally(results)
    meta = {"command": COMMAND, "machine": machine(), "commit": _git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(seconds, 1), "jobs": jobs}
    if partial:
        meta["rerun_classes"], meta["other_classes_from"] = partial
    REPORT_JSON.parent.mkdir(parents=True, exist_ok=True)
    REPORT_JSON.write_text(json.dumps({**meta, "table": table,
                                       "cases": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
    lines = ["# Robustness catalogue", "",
             f"`{COMMAND}` (or `make robustness`): {table['total']['tried']} bad inputs through the real `p2p` CLI,",
             "each in a subprocess with its own copy of a prepared data dir (a profile, its cached adapter, a previous",
             "profile export and adapter export) and a timeout. Machine: " + meta["machine"] + f"; commit {meta['commit']};",
             f"{meta['date']}; {seconds:.0f} s with {jobs} cases at a time.", "",
             *([f"Re-run here: the classes {', '.join(partial[0])} (`{COMMAND} --classes ...`); the other classes'",
                f"rows are the previous full run's ({partial[1]}), kept from reports/robustness.json.", ""]
               if partial else []),
             "clean: exit code != 0 with an `error:` line and a hint (or, for `p2p` / `p2p profile` alone, the help with",
             "exit code 2). traceback: a Python traceback on stderr or the",
             "CLI's internal-error guard (exit 70). abort: killed by a signal (GGML_ASSERT, segfault). hang: the timeout",
             "passed. files lost: afterwards the store fails `PRAGMA integrity_check` or lost items, or a previous",
             "export is gone or was changed by a failed command.", "",
             "| class | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for cls, row in table.items():
        name = f"**{cls}**" if cls == "total" else cls
        lines.append(f"| {name} | " + " | ".join(str(row[k]) for k in COLUMNS) + " |")
    lines += ["", "What each class feeds the app:", "",
              "- adapters: a cached adapter replaced by a damaged one whose checksum is recorded as valid (junk,",
              "  truncated, wrong shapes, rank 0, NaN/Inf, 3-D A, f64/int32, unknown targets, bad alpha, other base...),",
              "  then `ask`, `personalize` or `adapter export`;",
              "- base models: `models add` with junk, truncated GGUFs, block_count 0, no tensors, FIFO, /dev/zero,",
              "  a sparse 200 GB file, bad names; a damaged default base under `ask --base` and `personalize`;",
              "- bundles: `personalize --bundle` with manifest fields of the wrong type or range, a missing or damaged",
              "  hypernet.onnx;",
              "- imports: oversize fields, deep JSON, huge ints, inf/NaN times, out-of-range ratings, lone surrogates,",
              "  invalid UTF-8, NUL, FIFO, /dev/zero, a sparse 5 GB file, malformed CSV;",
              "- profile names: newlines, path separators, empty, too long, control characters, for create / show /",
              "  import / personalize / forget / ask;",
              "- exports: to a directory, a missing parent, /dev/full, a read-only directory, over an existing file on a",
              "  full disk (a 64 KiB tmpfs), and reading commands on a read-only data dir;",
              "- odd queries: invalid UTF-8 in argv and stdin, empty, 100 KB in argv, 1 MB on stdin, special tokens;",
              "- CLI arguments: bad --scale / --temperature / --max-tokens / --items, unknown tasks and commands;",
              "- hangs: one 1 MB word in a commit (the e-mail scrub was quadratic), `chat` without a terminal;",
              "- files destroyed: exports over a device node, a FIFO, a link to one; PEFT exports over the user's folder;",
              "- injected data: file names holding git's separators (another author's item, one commit cut in two);",
              "- caught crashes: Letterboxd years, a store of random bytes, stdin opened write-only, a read-only hooks",
              "  folder holding a foreign hook;",
              "- concurrency: two imports of one file or repository at once, a failing `--create`, `--dry-run` on a new",
              "  machine (writes nothing);",
              "- export names: two non-Latin profile names, README commands on a folder with spaces and `$(...)`;",
              "- stdin: a UTF-8 BOM before a diff, 50 MB of text, a 50 MB diff;",
              "- privacy: nothing new in $HOME (checked after every case), 0700/0600 in the data dir, forget removes",
              "  exports, escape sequences stripped from `profile show`;",
              "- bad values: --temperature / --max-tokens, hook install with an unknown profile or task, Letterboxd NUL",
              "  and absurd ratings, alpha 1e30 and weights x1e5 in a cached adapter, a bundle's alpha 1e30.", "",
              "bad data accepted / wrong result: the case's own check (a special file replaced, an injected item,",
              "doubled items, a file written outside the data dir, a diff not read ...).", ""]
    outcomes: dict[str, list[str]] = {}
    for r in results:
        outcomes.setdefault(r.outcome, []).append(f"{r.cls}: {r.name}")
    if outcomes.get("success"):
        lines += ["Cases that succeeded (the app repaired or accepted the input, e.g. regenerated a refused cached",
                  f"adapter): {len(outcomes['success'])}; the full list with exit codes is in `reports/robustness.json`.",
                  ""]
    problems = bad(results) + [r for r in results if r.outcome == "unclear"]
    if problems:
        lines += ["## Cases to fix", ""]
        for r in problems:
            lines.append(f"- {r.cls}: {r.name}: {r.outcome} (rc {r.rc}) {'; '.join(r.lost)} {r.wrong}")
        lines.append("")
    REPORT_MD.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="cases at a time (default 2)")
    ap.add_argument("--per-class", type=int, default=0, help="only a sample of N cases per class (no report)")
    ap.add_argument("--only", help="only cases whose class or name contains this")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--classes", help="comma-separated classes to re-run; the report keeps the other classes' "
                                      "results from the previous reports/robustness.json and says so")
    args = ap.parse_args(argv)
    cases = catalogue()
    rerun = [c.strip() for c in args.classes.split(",")] if args.classes else []
    if rerun:
        unknown = set(rerun) - set(CLASSES)
        if unknown:
            ap.error(f"unknown classes {sorted(unknown)}; known: {', '.join(CLASSES)}")
        cases = [c for c in cases if c.cls in rerun]
    if args.only:
        cases = [c for c in cases if args.only in c.cls or args.only in c.name]
    if args.per_class:
        cases = sample(cases, args.per_class)
    t0 = time.perf_counter()
    results = run(cases, jobs=args.jobs, progress=True)
    seconds = time.perf_counter() - t0
    table = tally(results)
    print(json.dumps(table["total"]))
    if not (args.no_report or args.per_class or args.only):
        kept = previous_results(exclude=rerun) if rerun else None
        write_report(results + (kept[0] if kept else []), seconds, args.jobs,
                     partial=(rerun, kept[1]) if kept else None)
        print(f"wrote {REPORT_MD} and {REPORT_JSON}")
    problems = bad(results)
    for r in problems:
        print(f"FAIL {r.cls}: {r.name}: {r.outcome} rc={r.rc} {r.lost} {r.wrong}\n{r.stderr_tail}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
