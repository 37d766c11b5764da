"""`p2p bench serve`: what `p2p serve` costs over calling `Session.answer` in the same process.

The same questions at 1, 4 and 16 concurrent clients, two ways in one process on one loaded model: client
threads calling `Session.answer` (which serialises them on the route's lock) and client threads posting to
the server (`p2p_local.serve`: uvicorn on loopback, its queue in front of the same Session) over HTTP with
keep-alive connections. Requests per second and p50 / p99 latency per level; the two paths alternate level
by level, so load from elsewhere on a shared machine hits both alike. Two workloads: the demo profile's
ratings (one evaluation of the prompt, read off the label distribution) and free chat on the base model
(greedy, a few tokens). Every question is asked once first, so both paths use the cached adapters.

Runs in a throwaway data dir (the demo profile imported), never in the user's.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from p2p_lab.plots import pyplot, save
from p2p_local.files import atomic_write

LEVELS = (1, 4, 16)
RATING_QUERIES = [f"{t} | Genres: {g}" for t, g in (
    ("Heat (1995)", "Action|Crime|Thriller"), ("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"),
    ("Alien (1979)", "Horror|Sci-Fi"), ("Fargo (1996)", "Comedy|Crime|Drama|Thriller"),
    ("Amelie (2001)", "Comedy|Romance"), ("Se7en (1995)", "Mystery|Thriller"),
    ("Casablanca (1942)", "Drama|Romance"), ("Jumanji (1995)", "Adventure|Children|Fantasy"),
)]
CHAT_QUERIES = ["What is a good film for a rainy evening?", "Name a classic crime film.",
                "Which films are like Alien?", "Suggest a comedy for tonight."]


NOTES = (
    "A shared 2-core machine: figures move by 10-20% from run to run; a ratio within that of 1.0 means the "
    "server adds nothing measurable beside the model's own time (one request at a time on one engine either way).",
    "Tail latency: the server's queue answers in arrival order; in process, the threads wait on the route's lock, "
    "which is not first-come first-served, so under load a waiting thread can be passed over several times and "
    "the in-process tail can exceed the server's.",
)


def _pctl(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def run_level(ask: Callable[[str], None], queries: list[str], clients: int, n: int) -> dict[str, float]:
    """`n` requests (the queries in turn) from `clients` threads at once; each thread takes the next request
    when its last one is answered. Returns requests/s over the whole and the latency percentiles (ms)."""
    lock, latencies, errors = threading.Lock(), [], []
    next_i = iter(range(n))
    start = threading.Barrier(clients + 1)

    def client() -> None:
        start.wait()
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                ask(queries[i % len(queries)])
            except Exception as e:  # counted and reported, not hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append((time.perf_counter() - t) * 1e3)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed; the first: {errors[0]}")
    return {"requests_per_s": round(n / wall, 2), "p50_ms": _pctl(latencies, 50), "p99_ms": _pctl(latencies, 99),
            "mean_ms": round(statistics.fmean(latencies), 1), "requests": n}


class _Http:
    """One keep-alive connection per client thread, posting /v1/completions."""

    def __init__(self, port: int, model: str, max_tokens: int) -> None:
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.local = threading.local()

    def __call__(self, query: str) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = json.dumps({"model": self.model, "prompt": query, "max_tokens": self.max_tokens})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        json.loads(data)["choices"][0]["text"]  # parsed, as a client would


@contextlib.contextmanager
def _home(tmp: Path) -> Iterator[None]:
    """P2P_HOME in `tmp` (the store, the adapter cache), the prepared models where they are."""
    from p2p_local.paths import models_dir

    models = str(models_dir())  # resolved before the home moves
    with mock.patch.dict(os.environ, P2P_HOME=str(tmp), P2P_MODELS=models):
        yield


def bench_serve(levels: tuple[int, ...] = LEVELS, requests: int = 32, max_tokens: int = 16,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """In-process `Session.answer` vs `p2p serve` over HTTP, per workload and concurrency level."""
    import uvicorn

    from p2p_local import serve
    from p2p_local.demo import import_demo
    from p2p_local.personalize import Session
    from p2p_local.store import Store

    out: dict[str, Any] = {"levels": list(levels), "requests_per_level": requests, "max_tokens_chat": max_tokens,
                           "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="p2p-bench-serve-") as tmp, _home(Path(tmp)):
        with contextlib.closing(Store()) as store:
            import_demo(store, "demo")
        session = Session.open()  # as `p2p serve` opens it
        app = serve.App(session, queue=max(levels))
        server = uvicorn.Server(serve.server_config(app, log_level="warning", access_log=False))
        sock = serve.bind("127.0.0.1", 0)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            while not server.started:
                time.sleep(0.05)
            port = sock.getsockname()[1]
            workloads = {
                "rating": (RATING_QUERIES, "p2p/demo/movielens-rating",
                           lambda q: session.answer(q, profile="demo", task="movielens-rating").text),
                "chat": (CHAT_QUERIES, "p2p/base",
                         lambda q: session.answer(q, task="chat", personalized=False, max_tokens=max_tokens).text),
            }
            for name, (queries, model, in_process) in workloads.items():
                for q in queries:  # warm-up: adapters made and cached, both paths then read the cache
                    in_process(q)
                http_ask = _Http(port, model, max_tokens)
                http_ask(queries[0])
                rows: dict[str, dict[str, Any]] = {"in_process": {}, "http": {}}
                for k, clients in enumerate(levels):
                    paths = [("in_process", in_process), ("http", http_ask)]
                    for path, ask in (paths if k % 2 == 0 else paths[::-1]):
                        log(f"bench serve: {name}, {clients} client(s), {path} ...")
                        # at least two requests per client, so every client is busy at the same time
                        rows[path][str(clients)] = run_level(ask, queries, clients, max(requests, 2 * clients))
                out["workloads"][name] = {"model": model, "queries": len(queries), **rows}
        finally:
            server.should_exit = True
            thread.join(60)
            session.close()
    for w in out["workloads"].values():
        w["http_vs_in_process"] = {
            c: {"requests_per_s": round(w["http"][c]["requests_per_s"] / w["in_process"][c]["requests_per_s"], 3),
                "p50_added_ms": round(w["http"][c]["p50_ms"] - w["in_process"][c]["p50_ms"], 1)}
            for c in w["http"]}
    return out


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        "# `p2p serve` against `Session.answer` in one process",
        "",
        f"Command: `{m['command']}`  ",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs (shared with other work), {m['platform']}, Python {m['python']}, "
        f"P2P_THREADS={m['p2p_threads']}; load average {m['load_before']} before, {m['load_after']} after; "
        f"{m['date']}.",
        "",
        f"{rep['requests_per_level']} requests per level and path (at least two per client); each client sends its "
        "next request when its "
        "last is answered. In process: client threads call `Session.answer` (the route's lock serialises them). "
        "HTTP: client threads post `/v1/completions` to `p2p serve`'s app (uvicorn, loopback, keep-alive) over "
        "the same Session, whose queue serialises them on one worker thread. The paths alternate level by level. "
        f"p99 of {rep['requests_per_level']} requests is close to their maximum.",
        "",
        "| workload | clients | in-process req/s | HTTP req/s | HTTP / in-process | in-process p50 ms | HTTP p50 ms "
        "| in-process p99 ms | HTTP p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, w in rep["workloads"].items():
        for c in w["http"]:
            a, b = w["in_process"][c], w["http"][c]
            lines.append(f"| {name} ({w['model']}) | {c} | {a['requests_per_s']} | {b['requests_per_s']} | "
                         f"{w['http_vs_in_process'][c]['requests_per_s']:.2f}x | {a['p50_ms']} | {b['p50_ms']} | "
                         f"{a['p99_ms']} | {b['p99_ms']} |")
    lines += ["", "Workloads: `rating` = the demo profile's movie ratings (8 queries; its cached adapters; one "
              "evaluation of the prompt each); `chat` = free chat on the base model (4 questions, greedy, "
              f"at most {rep['max_tokens_chat']} tokens)."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in rep.get("notes", NOTES)]
    return "\n".join(lines) + "\n"


def plot(rep: dict[str, Any], path: Path) -> None:
    """Requests/s and p50/p99 latency against clients, per workload, the two paths side by side."""
    with pyplot(path.parent) as plt:
        names = list(rep["workloads"])
        fig, axes = plt.subplots(len(names), 2, figsize=(9, 3.2 * len(names)), squeeze=False)
        for row, name in zip(axes, names, strict=True):
            w = rep["workloads"][name]
            levels = [int(c) for c in w["http"]]
            for path_name, color in (("in_process", "#4a7fb5"), ("http", "#b5654a")):
                label = "Session.answer" if path_name == "in_process" else "p2p serve (HTTP)"
                rows = [w[path_name][str(c)] for c in levels]
                row[0].plot(levels, [r["requests_per_s"] for r in rows], marker="o", color=color, label=label)
                row[1].plot(levels, [r["p50_ms"] for r in rows], marker="o", color=color, label=f"{label} p50")
                row[1].plot(levels, [r["p99_ms"] for r in rows], marker="x", ls="--", color=color,
                            label=f"{label} p99")
            for ax in row:
                ax.set_xscale("log", base=2)
                ax.set_xticks(levels, [str(c) for c in levels])
                ax.set_xlabel("concurrent clients")
            row[0].set_ylabel("requests/s")
            row[0].set_ylim(bottom=0)
            row[1].set_ylabel("latency ms")
            row[0].set_title(f"{name}: throughput", fontsize=10)
            row[1].set_title(f"{name}: latency", fontsize=10)
            row[0].legend(fontsize=7)
            row[1].legend(fontsize=7)
        fig.suptitle(f"p2p serve vs Session.answer ({rep['machine']['cpus']}-core CPU)", fontsize=11)
        save(fig, path)


def run(args: argparse.Namespace) -> int:
    """`p2p bench serve [--requests N] [--json-out FILE]`: the JSON, and beside it the .md table and .png."""
    import sys

    from p2p_lab.bench import machine
    from p2p_local.commands.args import missing_modules
    from p2p_local.commands.serve import SERVE_HINT, SERVE_MODULES
    from p2p_local.errors import UsageError

    missing = missing_modules(SERVE_MODULES)
    if missing:
        raise UsageError(f"`p2p bench serve` needs the serve extra ({', '.join(missing)} missing)", hint=SERVE_HINT)
    if not 1 <= args.requests <= 10_000:
        raise UsageError("--requests must be between 1 and 10000")
    load_before = round(os.getloadavg()[0], 2)
    rep = bench_serve(requests=args.requests, log=lambda line: print(line, file=sys.stderr, flush=True))
    command = f"p2p bench serve --requests {args.requests}" + (f" --json-out {args.json_out}" if args.json_out else "")
    rep["machine"] = {**machine(), "cpu": cpu_name(), "p2p_threads": os.environ.get("P2P_THREADS") or "all cores",
                      "command": command, "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rep["notes"] = list(NOTES)
    text = json.dumps(rep, indent=2)
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text + "\n", mode=0o644)
        atomic_write(out.with_suffix(".md"), markdown(rep), mode=0o644)
        plot(rep, out.with_suffix(".png"))
        print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    print(text if args.json else markdown(rep))
    return 0
