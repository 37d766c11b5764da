"""Privacy, tested: import -> personalize -> ask -> a chat exchange in the Textual app, in a child process
inside a network namespace with no interfaces up (`unshare -rn`: native code cannot reach a network either)
and with an audit hook that refuses and records every socket and subprocess event, with torch blocked.
The flow is import -> personalize -> ask -> a chat turn -> adapter export -> forget, with $HOME, the XDG
dirs and TMPDIR pointed at empty folders: nothing appears outside the data dir (onnxruntime's telemetry
record did), every folder of it is 0700 and every file 0600, and `p2p profile forget` removes items,
cached adapters, chat history and the profile's exports (checked on disk).

Each guard is shown failing against a planted bug (`PLANT`): a socket connect inside ask, an `import torch`
inside personalize, a subprocess inside personalize, onnxruntime loaded with its telemetry on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MARKER = "Zyzzogeton Quuxfilm"  # a title no file outside the data dir can contain by chance

# The child: guards first (before anything of p2p_local is imported), then the whole flow.
FLOW = textwrap.dedent(
    """
    import json, os, socket, sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError, loudly
    attempts = []
    REFUSED = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.fork",
               "os.forkpty", "pty.spawn", "urllib.Request", "http.client.connect", "ftplib.connect",
               "smtplib.connect", "poplib.connect", "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open")

    def hook(event, args):
        if not event.startswith(REFUSED):
            return
        # asyncio (the chat's event loop) makes an AF_UNIX socketpair for its self-pipe: local IPC inside
        # this process, never a network. Every other socket is refused.
        if event == "socket.__new__" and len(args) > 1 and args[1] == socket.AF_UNIX:
            return
        attempts.append(event + " " + repr(args)[:120])
        raise PermissionError(f"test_privacy: {event} refused")

    sys.addaudithook(hook)

    plant = os.environ.get("PLANT", "")
    if plant == "telemetry":  # the bug this guards against: onnxruntime loaded without the variable
        import p2p_local
        os.environ.pop("ORT_DISABLE_TELEMETRY", None)
    elif plant:
        import p2p_local.personalize as personalize
        real = personalize.Session.personalize

        def planted(self, *a, **k):
            if plant == "socket":
                try:
                    socket.create_connection(("198.51.100.7", 443), timeout=1).close()
                except OSError:
                    pass  # a careless library swallowing the error: the hook still saw it
            elif plant == "torch":
                import torch  # noqa: F401
            elif plant == "subprocess":
                import subprocess
                try:
                    subprocess.run(["true"])
                except OSError:
                    pass
            return real(self, *a, **k)

        personalize.Session.personalize = planted

    import asyncio
    from p2p_local.cli import main

    codes = [
        main(["profile", "create", "priv", "--task", "movielens-rating"]),
        main(["profile", "import", "priv", sys.argv[1]]),
        main(["personalize", "priv", "--query", "Heat (1995) | Genres: Action", "--json"]),
        main(["ask", sys.argv[2], "--profile", "priv", "--task", "movielens-rating", "--json"]),
        main(["adapter", "export", "priv", "--to", os.path.join(os.environ["P2P_HOME"], "exports"),
              "--query", sys.argv[2]]),
    ]

    async def chat():
        from p2p_local.personalize import Session
        from p2p_local.tui import ChatApp
        from p2p_local.tui.widgets import ChatInput, MessageView

        session = Session.open()
        try:
            app = ChatApp(session, profile="priv", task="movielens-rating")
            async with app.run_test(size=(120, 40)) as pilot:
                screen = app.chat
                screen.query_one(ChatInput).load_text(sys.argv[2])
                await pilot.press("enter")
                for _ in range(2400):  # 120 s
                    await pilot.pause(0.05)
                    if not screen.busy and not screen.query(".streaming"):
                        break
                await pilot.pause()
                views = [v for v in screen.query(MessageView) if v.role == "assistant"]
                stored = session.store.conversations.messages(screen.conversation_id)
                await pilot.press("ctrl+s")  # export the chat (forget must remove it too)
                await pilot.pause()
                return {"reply": views[-1].text if views else None, "stored": [m.role for m in stored]}
        finally:
            session.close()

    chat_out = asyncio.run(chat())
    interfaces = [ln.split(":")[0].strip() for ln in open("/proc/net/dev").read().splitlines()[2:]]
    print(json.dumps({"codes": codes, "attempts": attempts, "chat": chat_out, "interfaces": interfaces,
                      "torch_imported": sys.modules.get("torch") is not None}))
    """
)


def netns_prefix() -> list[str]:
    """`unshare -rn` when this machine allows it (a network namespace with only a downed loopback)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"]
    return []


# onnxruntime keeps its telemetry off when one of these is set (they mark a CI machine); a user's laptop has
# none, so the flow runs without them, or the planted-telemetry test would pass by luck on CI and fail there.
CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
              "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
              "ORT_RUNNING_UNIT_TESTS")


def run_flow(sandbox: Path, home: Path, models: Path, ratings: Path, plant: str = "") -> tuple[int, dict | None, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "P2P_")) and k not in CI_MARKERS}
    env.update(HOME=str(sandbox / "home"), TMPDIR=str(sandbox / "tmp"), XDG_DATA_HOME=str(sandbox / "xdg-data"),
               XDG_CACHE_HOME=str(sandbox / "xdg-cache"), XDG_CONFIG_HOME=str(sandbox / "xdg-config"),
               P2P_HOME=str(home), P2P_MODELS=str(models), PLANT=plant)
    for d in ("home", "tmp"):
        (sandbox / d).mkdir(parents=True, exist_ok=True)
    cmd = [*netns_prefix(), sys.executable, "-c", FLOW, str(ratings), f"{MARKER} (2001) | Genres: Drama"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else None
    except ValueError:
        out = None
    return proc.returncode, out, proc.stderr[-3000:]


def check_private_run(rc: int, out: dict | None, err: str) -> dict:
    """What the test demands of one run; raises AssertionError naming what broke."""
    assert rc == 0 and out is not None, err
    assert out["codes"] == [0, 0, 0, 0, 0], (out, err)
    assert out["attempts"] == [], f"something tried to open a connection or a process: {out['attempts']}"
    assert out["torch_imported"] is False, "torch was imported"
    assert out["chat"]["reply"], out["chat"]
    assert out["chat"]["stored"][-2:] == ["user", "assistant"], out["chat"]
    return out


def _user_file(tmp_path: Path) -> Path:
    items = [{"input": f"{MARKER} {i} (2001) | Genres: Drama", "output": str(1 + i % 5), "time": 1e9 + i,
              "meta": {"genres": ["Drama"]}} for i in range(30)]
    ratings = tmp_path / "user.jsonl"
    ratings.write_text(json.dumps({"user_id": "u1", "items": items}) + "\n")
    return ratings


def written_outside(sandbox: Path, home: Path) -> list[Path]:
    """Every file and folder the run left in the sandbox outside the data dir: $HOME, the XDG dirs and
    TMPDIR start empty and must stay so (onnxruntime wrote its telemetry to the cache dir)."""
    return sorted(p for p in sandbox.rglob("*") if home not in p.parents and p != home
                  and p not in (sandbox / "home", sandbox / "tmp"))


def not_private(home: Path) -> list[str]:
    """Folders of the data dir that are not 0700 and files that are not 0600."""
    bad = []
    for p in [home, *home.rglob("*")]:
        mode, want = p.stat().st_mode & 0o777, (0o700 if p.is_dir() else 0o600)
        if mode != want:
            bad.append(f"{p.relative_to(home)} {mode:o}")
    return bad


def files_containing(root: Path, needle: bytes, skip: Path | None = None) -> list[Path]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and (skip is None or skip not in p.parents):
            if needle in p.read_bytes():
                hits.append(p)
    return hits


def test_offline_and_private_end_to_end(tmp_path: Path, base_model_path: Path) -> None:
    from p2p_local import paths

    models = paths.models_dir()
    sandbox = tmp_path / "sandbox"
    home = sandbox / "data"
    ratings = _user_file(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}

    out = check_private_run(*run_flow(sandbox, home, models, ratings))
    if netns_prefix():
        assert out["interfaces"] == ["lo"], f"the child was not in an empty network namespace: {out['interfaces']}"

    # the profile's text exists only inside the data dir (the input file aside) ...
    assert files_containing(home, MARKER.encode()), "the store should hold the profile"
    assert files_containing(sandbox, MARKER.encode(), skip=home) == []
    changed = [p for p in models.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    assert not any(MARKER.encode() in p.read_bytes() for p in changed)
    adapters = list((home / "adapters").rglob("*.gguf"))
    assert adapters, "personalize must have cached an adapter in the data dir"
    exported = list((home / "exports").glob("conversation-*.md"))
    assert exported and MARKER in exported[0].read_text(), "the chat export should hold the question"
    adapter_exports = [p for p in (home / "exports").iterdir() if p not in exported]
    assert len(adapter_exports) == 3, adapter_exports  # gguf, README (it holds the query), Modelfile
    exported += adapter_exports
    assert written_outside(sandbox, home) == [], "a file was written outside the data dir"
    assert not_private(home) == []

    # ... and forget removes it: rows, adapter files, chat history
    env = dict(os.environ, P2P_HOME=str(home), P2P_MODELS=str(models))
    proc = subprocess.run([sys.executable, "-m", "p2p_local.cli", "profile", "forget", "priv", "--yes", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in adapters + exported)
    assert files_containing(home, MARKER.encode()) == []
    assert written_outside(sandbox, home) == []
    import sqlite3

    con = sqlite3.connect(home / "p2p.sqlite3")
    assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    con.close()
    assert (os.stat(home / "p2p.sqlite3").st_mode & 0o777) == 0o600


@pytest.mark.parametrize("plant, broken", [("socket", "tried to open a connection"), ("torch", "codes"),
                                           ("subprocess", "tried to open a connection or a process")])
def test_the_privacy_guards_catch_a_planted_bug(tmp_path: Path, base_model_path: Path, plant: str,
                                                broken: str) -> None:
    """The same flow with a bug planted in personalize: the check above must fail, naming it.
    (torch: personalize exits non-zero with the ImportError, so the exit codes differ.)"""
    from p2p_local import paths

    rc, out, err = run_flow(tmp_path / "sandbox", tmp_path / "sandbox" / "data", paths.models_dir(),
                            _user_file(tmp_path), plant=plant)
    with pytest.raises(AssertionError, match=broken):
        check_private_run(rc, out, err)


def test_the_outside_files_check_catches_onnxruntime_telemetry(tmp_path: Path, base_model_path: Path) -> None:
    """The planted bug: onnxruntime loaded without ORT_DISABLE_TELEMETRY (as before this guard); its device
    id and telemetry database appear outside the data dir, and the check above names them."""
    from p2p_local import paths

    sandbox, home = tmp_path / "sandbox", tmp_path / "sandbox" / "data"
    check_private_run(*run_flow(sandbox, home, paths.models_dir(), _user_file(tmp_path), plant="telemetry"))
    leaked = written_outside(sandbox, home)
    assert any("onnxruntime" in str(p) for p in leaked), leaked
