"""`p2p serve`: the OpenAI-compatible server answers as `p2p ask` answers (the same route, the same text),
driven by the official `openai` client; and it holds up against bad requests, crowds and slow clients.

One server (uvicorn in a thread, the real Gemma GGUF, a store with the demo profile) serves the module; one
test starts `p2p serve` itself as a process, beside `p2p ask --json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from p2p_local import serve  # noqa: E402

pytestmark = pytest.mark.real
Q = "Heat (1995) | Genres: Action|Crime|Thriller"
RATING = "p2p/demo/movielens-rating"
DIFF = """diff --git a/src/cache.py b/src/cache.py
--- a/src/cache.py
+++ b/src/cache.py
@@ -1,3 +1,4 @@
 def cleanup(tmpdir):
-    shutil.rmtree(tmpdir)
+    # windows keeps files open a moment longer
+    shutil.rmtree(tmpdir, ignore_errors=True)
"""


# --- the served module: one server for the tests below -------------------------------------------------
class Served:
    def __init__(self, app: serve.App, port: int, store: Path) -> None:
        self.app, self.port, self.store = app, port, store
        self.session = app.session
        self.url = f"http://127.0.0.1:{port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)

    def idle(self, within: float = 5.0) -> bool:
        end = time.monotonic() + within
        while time.monotonic() < end:
            if self.app.engine._current is None and not self.app.engine.waiting:
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """The server on a free loopback port, over a Session on the shared engine with the demo profile."""
    from p2p_local import paths
    from p2p_local.bundle import Bundle
    from p2p_local.demo import import_demo
    from p2p_local.encoder import Encoder
    from p2p_local.personalize import Session
    from p2p_local.store import Store

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("P2P_MODELS", str(paths.models_dir()))  # resolved before the home moves
        home = tmp_path_factory.mktemp("serve-home")
        mp.setenv("P2P_HOME", str(home))
        store = Store()
        import_demo(store, "demo")
        session = Session(engine, Bundle.load(), Encoder.load(), store)
        app = serve.App(session, queue=8)
        try:
            with running(app, head_timeout=1.5) as port:
                s = Served(app, port, store.path)
                s.user_data = user_data(store.path)
                yield s
        finally:  # as the `session` fixture leaves the shared engine
            session.route.loaded.clear()
            for st in session._stores:
                try:
                    st.close()
                except Exception:  # another thread's connection (closed there by the server's shutdown)
                    pass
            engine.use(None)


@contextlib.contextmanager
def running(app: serve.App, **config) -> Iterator[int]:
    """`app` served by uvicorn in a thread on a free loopback port (yielded); stopped on the way out."""
    import uvicorn

    server = uvicorn.Server(serve.server_config(app, log_level="warning", access_log=False, **config))
    sock = serve.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def user_data(db: Path) -> str:
    """A hash of what the user owns in the store: every table but the adapter cache (which the server may
    add rows to, as `p2p ask` does), read through a read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        h = hashlib.sha256()
        for table in ("profiles", "items", "item_history", "conversations", "messages", "task_cards"):
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY 1")
            cols = [d[0] for d in cur.description]
            for row in cur:
                h.update(repr([v for c, v in zip(cols, row, strict=True) if c != "adapter_stale"]).encode())
        return h.hexdigest()
    finally:
        conn.close()


def files_hash(db: Path) -> str:
    """The store's files, byte for byte (the database and its write-ahead log)."""
    h = hashlib.sha256()
    for p in sorted(db.parent.glob(db.name + "*")):
        if p.suffix != ".import-lock":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def raw(port: int, data: bytes, *, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the response's status, headers and body (read to the connection's end)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return parse(read_all(s))


def read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def parse(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


def post(path: str, body: bytes | str, *, content_type: str = "application/json", host: str = "127.0.0.1",
         extra: str = "") -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body


def error_of(status: int, body: bytes) -> dict:
    """The OpenAI error shape, and never a traceback."""
    assert b"Traceback" not in body and b'File "' not in body, body[:300]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


# --- answers: the same as `p2p ask`'s --------------------------------------------------------------------
def test_models_lists_the_base_and_each_profiles_tasks(served) -> None:
    c = served.client()
    ids = [m.id for m in c.models.list()]
    assert ids == ["p2p/base", RATING]
    assert c.models.retrieve(RATING).model_extra["p2p"] == {"profile": "demo", "task": "movielens-rating",
                                                            "items": 119}
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("p2p/nobody/movielens-rating")


def test_chat_and_completions_answer_as_the_session_does(served) -> None:
    c = served.client()
    want = served.session.answer(Q, profile="demo", task="movielens-rating").text

    r = c.chat.completions.create(model=RATING, messages=[{"role": "user", "content": Q}])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.model == RATING and r.object == "chat.completion"
    p2p = r.model_extra["p2p"]
    assert p2p["profile"] == "demo" and p2p["task"] == "movielens-rating" and p2p["scale"] == 1.0
    assert p2p["adapter"].endswith(".gguf") and list(p2p["distribution"]) == ["1", "2", "3", "4", "5"]
    assert r.usage.completion_tokens == 1 and r.usage.prompt_tokens > 10

    # The same question, streamed, through /v1/completions and chosen by the body's fields.
    chunks = list(c.completions.create(model="p2p", prompt=Q, stream=True,
                                       extra_body={"profile": "demo", "task": "movielens-rating"}))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["p2p"]["profile"] == "demo"

    # strength 0: the profile's task without its adapter (`ask --scale 0`)
    base = served.session.answer(Q, profile="demo", task="movielens-rating", scale=0.0).text
    r0 = c.completions.create(model=RATING, prompt=Q, extra_body={"strength": 0})
    assert r0.choices[0].text == base and r0.model_extra["p2p"]["adapter"] is None


def test_free_chat_streams_the_sessions_answer_with_the_transcript(served) -> None:
    c = served.client()
    earlier = [("user", "I like old films."), ("assistant", "Noted: classics it is.")]
    question = "Name one film I might like."
    want = served.session.answer(question, task="chat", personalized=False, transcript=earlier, max_tokens=12)
    messages = [{"role": "system", "content": "ignored"}] + [{"role": r, "content": t} for r, t in earlier] \
        + [{"role": "user", "content": question}]
    stream = c.chat.completions.create(model="p2p/base", messages=messages, max_tokens=12, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.text and text
    last = [ch for ch in chunks if ch.choices][-1]
    finish = {"length": "length"}.get(want.finish_reason, "stop")
    assert last.choices[0].finish_reason == finish and last.model_extra["p2p"]["finish"] == want.finish_reason
    assert chunks[-1].usage.completion_tokens > 0  # include_usage: a last chunk without choices

    plain = c.completions.create(model="p2p/base", prompt=question, max_tokens=12)
    alone = served.session.answer(question, task="chat", personalized=False, max_tokens=12).text
    assert plain.choices[0].text == alone and plain.model_extra["p2p"]["adapter"] is None


def test_a_seed_repeats_a_sampled_answer(served) -> None:
    c = served.client()
    kw = {"model": "p2p/base", "prompt": "Name a film.", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first, again = (c.completions.create(**kw).choices[0].text for _ in range(2))
    assert first == again and first


def test_a_diff_is_read_as_ask_reads_it(served) -> None:
    """A staged diff sent to the commit task: the same query rule as `git diff --cached | p2p ask -`."""
    c = served.client()
    want = served.session.answer(DIFF, profile="demo", task="commit-subject", max_tokens=8)
    r = c.completions.create(model="p2p/demo/commit-subject", prompt=DIFF, max_tokens=8)
    p2p = r.model_extra["p2p"]
    assert r.choices[0].text == want.text
    assert p2p["read"] == want.request.read and p2p["read"]["files"] == 1
    assert p2p["query"].startswith("files: ") and p2p["candidates"][0]["text"] == want.text


def test_p2p_serve_answers_as_p2p_ask_and_stops_on_sigterm(served, tmp_path) -> None:
    """The command itself: `p2p serve` in a process beside `p2p ask --json` on the same data dir."""
    env = {**os.environ, "P2P_HOME": str(tmp_path / "home"), "P2P_THREADS": "1",
           "P2P_MODELS": os.environ.get("P2P_MODELS") or str(_models_dir())}
    _import_demo(env)
    proc = subprocess.Popen([sys.executable, "-m", "p2p_local.cli", "serve", "--port", "0"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        port = _listening_port(proc)
        ask = subprocess.run([sys.executable, "-m", "p2p_local.cli", "ask", Q, "--profile", "demo", "--json"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert ask.returncode == 0, ask.stderr
        want = json.loads(ask.stdout)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        r = client.chat.completions.create(model="p2p/demo", messages=[{"role": "user", "content": Q}])
        assert r.choices[0].message.content == want["text"]
        assert r.model_extra["p2p"]["distribution"] == want["distribution"]

        # A second server on the same port: one clear line, no traceback, before any model loads.
        busy = subprocess.run([sys.executable, "-m", "p2p_local.cli", "serve", "--port", str(port)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and "cannot listen on 127.0.0.1" in busy.stderr
        assert "Traceback" not in busy.stderr and "--port" in busy.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            err = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "the model and the store are closed" in err and "Traceback" not in err


def _models_dir() -> Path:
    from p2p_local import paths

    return paths.models_dir()


def _import_demo(env: dict[str, str]) -> None:
    code = "from p2p_local.store import Store; from p2p_local.demo import import_demo; import_demo(Store())"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def _listening_port(proc: subprocess.Popen) -> int:
    """The port `p2p serve --port 0` printed (it prints once the model is loaded)."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                done.set()
                return
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(180), "p2p serve printed nothing"
    line = next((ln for ln in lines if "listening on" in ln), None)
    assert line is not None, "".join(lines)
    return int(line.split("http://127.0.0.1:")[1].split("/")[0])


# --- bad requests: 4xx in the OpenAI shape, never a traceback, nothing written ---------------------------
@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", '{"model": "p2p/base", "prompt": 42}', 400, "prompt"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "max_tokens": 5000}', 400, "max_tokens"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "max_tokens": true}', 400, "max_tokens"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "n": 2}', 400, "n"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "strength": 3}', 400, "strength"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "hi", "stop": ["\\n"]}', 400, "stop"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", '{"model": "p2p/base", "prompt": "   "}', 400, "prompt"),
    ("/v1/completions", '{"model": 7, "prompt": "hi"}', 400, "model"),
    ("/v1/completions", '{"model": "gpt-4o", "prompt": "hi"}', 404, "model"),
    ("/v1/completions", '{"model": "p2p/nobody/movielens-rating", "prompt": "hi"}', 404, "model"),
    ("/v1/completions", '{"model": "p2p/demo/no-such-task", "prompt": "hi"}', 404, "model"),
    ("/v1/completions", '{"model": "p2p", "profile": "nobody", "prompt": "hi"}', 404, "profile"),
    ("/v1/completions", '{"model": "p2p/demo", "profile": "other", "prompt": "hi"}', 400, "profile"),
    ("/v1/chat/completions", '{"model": "p2p/base", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", '{"model": "p2p/base", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", '{"model": "p2p/base", "messages": [{"role": "user", "content": 1}]}', 400,
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "p2p/base", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages[0].role"),
    ("/v1/chat/completions", '{"model": "p2p/base", "messages": [{"role": "assistant", "content": "x"}]}', 400,
     "messages"),
])
def test_bad_requests_get_4xx_in_the_openai_shape(served, path, body, status, param) -> None:
    got, _, data = raw(served.port, post(path, body))
    assert got == status, data
    assert error_of(got, data)["param"] == param


def test_wrong_routes_methods_hosts_origins_and_types_are_refused(served) -> None:
    before = files_hash(served.store)
    port = served.port
    got, _, data = raw(port, b"GET /v2/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert got == 404 and error_of(got, data)["code"] == "not_found"
    got, _, data = raw(port, b"GET /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert got == 405 and error_of(got, data)["code"] == "method_not_allowed"
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 still sends its own name.
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        got, _, data = raw(port, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert got == 400 and error_of(got, data)["code"] == "invalid_host", host
    got, _, _ = raw(port, f"GET /v1/models HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n".encode())
    assert got == 200
    # A web page (any Origin) is refused unless its origin was allowed; no CORS headers by default.
    got, headers, data = raw(port, post("/v1/completions", '{"model": "p2p/base", "prompt": "hi"}',
                                        extra="Origin: http://evil.example\r\n"))
    assert got == 403 and error_of(got, data)["code"] == "origin_not_allowed"
    assert not any(k.startswith("access-control-") for k in headers)
    # A form or text/plain post (what a page may send cross-site without a preflight) never reaches the model.
    got, _, data = raw(port, post("/v1/completions", '{"model": "p2p/base", "prompt": "hi"}',
                                  content_type="text/plain"))
    assert got == 415 and error_of(got, data)["code"] == "unsupported_media_type"
    assert files_hash(served.store) == before  # refusals write nothing at all


def test_huge_bodies_get_413(served) -> None:
    # Declared too large: refused before the body is sent.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {4 * serve.MAX_BODY}\r\n\r\n").encode()
    got, _, data = raw(served.port, head)
    assert got == 413 and error_of(got, data)["code"] == "request_too_large"
    # Chunked, no length said: refused once more than MAX_BODY bytes arrived.
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(serve.MAX_BODY // len(chunk) + 1):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        got, _, data = parse(read_all(s))
    assert got == 413 and error_of(got, data)["code"] == "request_too_large"


def test_slow_clients_hold_nothing(served, monkeypatch) -> None:
    """Slowloris: a request head trickling in does not stop others being answered, and is cut off (the test
    server's head deadline is 1.5 s); a body that never completes gets 408."""
    partial = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    t0 = time.monotonic()
    got, _, _ = raw(served.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert got == 200 and time.monotonic() - t0 < 5
    assert read_all(partial) == b"" and time.monotonic() - t0 < 8  # closed by the server
    partial.close()

    monkeypatch.setattr(serve, "BODY_TIMEOUT", 1.0)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\"")
        got, _, data = parse(read_all(s))
    assert got == 408 and error_of(got, data)["code"] == "request_timeout"


def test_twenty_clients_get_an_answer_or_429_and_the_server_lives(served, monkeypatch) -> None:
    monkeypatch.setattr(served.app.engine, "limit", 2)
    results: list[tuple[int, str | None, bytes]] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=300)
        body = json.dumps({"model": "p2p/base", "prompt": f"Say a number: {i}", "max_tokens": 8})
        start.wait()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        with lock:
            results.append((r.status, r.getheader("Retry-After"), r.read()))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 20
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for status, retry, data in results:
        if status == 429:
            assert retry is not None and int(retry) >= 1
            assert error_of(status, data)["code"] == "rate_limit_exceeded"
        else:
            assert json.loads(data)["choices"][0]["text"]
    assert served.idle()
    assert served.client().models.list().data  # alive


class _Slow:
    """An Answer whose pieces come slowly (so a client can leave mid-answer); closing closes the real one."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.answer.close()

    def __iter__(self):
        for piece in self.answer:
            time.sleep(0.1)
            yield piece


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(served, monkeypatch, stream) -> None:
    opened = []
    real = served.app.engine._open

    def slow(text, call):
        opened.append(real(text, call))
        return _Slow(opened[-1])

    monkeypatch.setattr(served.app.engine, "_open", slow)
    body = json.dumps({"model": "p2p/base", "stream": stream, "max_tokens": 64,
                       "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]})
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as s:
        s.sendall(post("/v1/chat/completions", body))
        if stream:
            seen = b""
            while seen.count(b"data: ") < 3:  # the role chunk and two pieces
                seen += s.recv(4096)
        else:
            time.sleep(0.5)
    t0 = time.monotonic()
    assert served.idle(3.0), "the generation went on after the client left"
    assert time.monotonic() - t0 < 3.0
    [answer] = opened
    assert answer.finish_reason is None  # closed mid-stream, not finished (stop/length/repeat)


def test_the_users_data_is_unchanged(served) -> None:
    """After every request above (run last in this module): profiles, items and conversations as they were;
    only the adapter cache may have grown."""
    assert user_data(served.store) == served.user_data


def test_an_allowed_origin_gets_cors_headers() -> None:
    """--cors-origin: that page may call the API (preflight and answers carry CORS headers); others may not.
    No model needed: the requests here end before one would answer."""
    app = serve.App(object(), cors_origins=["http://localhost:3000"])
    with running(app) as port:
        pre = ("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost:3000\r\n"
               "Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n"
               "Connection: close\r\n\r\n")
        got, headers, _ = raw(port, pre.encode())
        assert got == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        got, headers, data = raw(port, post("/v1/completions", "{bad", extra="Origin: http://localhost:3000\r\n"))
        assert got == 400 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert error_of(got, data)["code"] == "invalid_json"
        got, headers, _ = raw(port, pre.replace("localhost:3000", "localhost:3001").encode())
        assert got == 403 and "access-control-allow-origin" not in headers


# --- the command's checks (no model) --------------------------------------------------------------------
def test_a_remote_host_needs_allow_remote_and_is_warned_about(monkeypatch, capsys) -> None:
    from p2p_local.cli import main

    calls = []
    monkeypatch.setattr(serve, "serve", lambda **kw: calls.append(kw))
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err and not calls
    assert main(["serve", "--host", "0.0.0.0", "--allow-remote", "--queue", "3",
                 "--cors-origin", "http://localhost:3000"]) == 0
    assert "anyone who can reach this port" in capsys.readouterr().err
    assert calls == [{"host": "0.0.0.0", "port": 8765, "cors_origins": ["http://localhost:3000"], "queue": 3,
                      "say": calls[0]["say"]}]
    assert main(["serve", "--host", "localhost"]) == 0 and calls[-1]["host"] == "localhost"


def test_without_the_serve_extra_it_says_how_to_install_it(monkeypatch, capsys) -> None:
    from p2p_local.cli import main
    from p2p_local.commands import serve as command

    monkeypatch.setattr(command, "missing_modules", lambda names: ["starlette"])
    assert main(["serve"]) == 2
    assert "pip install 'p2p-local[serve]'" in capsys.readouterr().err


def test_host_headers_and_names() -> None:
    assert serve.host_name("127.0.0.1:8765") == "127.0.0.1"
    assert serve.host_name("[::1]:8765") == "::1" and serve.host_name("LocalHost.") == "localhost"
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.10")
    assert "evil.example" not in serve.allowed_hosts("127.0.0.1")
