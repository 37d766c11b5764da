"""Benchmarks: speed and memory, measured side by side in one run (the machine is shared and noisy).

Each suite returns a flat dict of figures plus the targets it is judged against; `p2p bench` prints
them as JSON and as a table. Comparisons are ratios of interleaved runs, never absolute thresholds.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from p2p_lab.plots import pyplot, save
from p2p_local import __version__
from p2p_local.data.format import TaskCard, builtin_cards

PROMPT = "Movie: The Matrix (1999) | Genres: Action|Sci-Fi|Thriller\nA short review of this movie:"


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "p2p_local": __version__}


def _ms(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def random_qv_lora(base, rank: int = 8, std: float | None = 0.02, seed: int = 0) -> dict:
    """Random (A, B) for q and v of every layer: N(0, std²), or with std None A ~ N(0, 1/n_in) and B ~ N(0, 1/rank),
    so that B @ A has entries of about W's size (what a parity check needs to see the adapter at all)."""
    from p2p_local.adapter import tensor_name

    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(base.n_layers):
        for module in ("attn_q", "attn_v"):
            name = tensor_name(layer, module)
            n_out, n_in = base.shapes[name]
            sa, sb = (std, std) if std is not None else (1 / np.sqrt(n_in), 1 / np.sqrt(rank))
            out[name] = (rng.normal(0, sa, (rank, n_in)).astype(np.float32),
                         rng.normal(0, sb, (n_out, rank)).astype(np.float32))
    return out


def bench_runtime(n_tokens: int = 64, rounds: int = 3) -> dict:
    """Base vs rank-8 q/v adapter generation speed (interleaved), adapter write / load+attach / switch."""
    from p2p_local.adapter import write_adapter
    from p2p_local.engine import Engine
    from p2p_local.models import DEFAULT_BASE, prepare_base

    path = prepare_base(DEFAULT_BASE)
    rss0 = _rss_mb()
    with Engine(path, n_ctx=512) as eng, tempfile.TemporaryDirectory() as tmp:
        rss_base = _rss_mb()
        lora = random_qv_lora(eng.base)
        write_ms = _ms(lambda: write_adapter(Path(tmp) / "w.gguf", lora, alpha=16.0, base=eng.base), 10)
        files = [write_adapter(Path(tmp) / f"a{i}.gguf", random_qv_lora(eng.base, seed=i), alpha=16.0, base=eng.base)
                 for i in range(6)]
        load_attach = []
        handles = []
        for f in files:  # load (validate + llama_adapter_lora_init) + attach, each a fresh file
            t = time.perf_counter()
            h = eng.load_adapter(f)
            eng.use(h, 1.0)
            load_attach.append((time.perf_counter() - t) * 1e3)
            handles.append(h)
        switch = []
        for i in range(20):  # between two adapters already loaded: attach + prompt-cache reset
            t = time.perf_counter()
            eng.use(handles[i % 2], 1.0)
            switch.append((time.perf_counter() - t) * 1e3)

        def tok_s(adapter) -> float:
            eng.use(adapter, 1.0)
            t = time.perf_counter()
            n = sum(1 for _ in eng.llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, stream=True))
            return n / (time.perf_counter() - t)

        base_runs, adapter_runs = [], []
        tok_s(None)  # warm-up
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
            base_runs.append(tok_s(None))
            adapter_runs.append(tok_s(handles[0]))
        rss_adapter = _rss_mb()
        size = files[0].stat().st_size
    base_tps, ad_tps = statistics.median(base_runs), statistics.median(adapter_runs)
    return {
        "base_tokens_per_s": round(base_tps, 2),
        "adapter_tokens_per_s": round(ad_tps, 2),
        "adapter_speed_ratio": round(ad_tps / base_tps, 4),
        "adapter_write_ms": round(statistics.median(write_ms), 2),
        "adapter_load_attach_ms": round(statistics.median(load_attach), 2),
        "switch_ms": round(statistics.median(switch), 3),
        "rss_base_mb": round(rss_base - rss0 if rss_base > rss0 else rss_base, 1),
        "rss_process_mb": round(rss_adapter, 1),
        "adapter_size_bytes": size,
        "targets": {"adapter_speed_ratio": ">= 0.90", "adapter_load_attach_ms": "<= 10", "adapter_write_ms": "<= 50"},
    }


DEMO = Path(__import__("p2p_local.demo", fromlist=["_"]).__file__).parent / "movielens-user76.jsonl"
QUERIES = [f"{t} | Genres: {g}" for t, g in (
    ("Heat (1995)", "Action|Crime|Thriller"), ("Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"),
    ("Alien (1979)", "Horror|Sci-Fi"), ("Fargo (1996)", "Comedy|Crime|Drama|Thriller"),
    ("Amelie (2001)", "Comedy|Romance"), ("Se7en (1995)", "Mystery|Thriller"),
    ("Casablanca (1942)", "Drama|Romance"), ("Jumanji (1995)", "Adventure|Children|Fantasy"),
)]


def _demo_items() -> list:
    import json

    from p2p_local.store import NewItem

    user = json.loads(DEMO.read_text().splitlines()[0])
    return [NewItem(i["input"], i["output"], i.get("time"), i.get("meta") or {}) for i in user["items"]]


def _session_with(n_items: int, home: Path):
    """A Session on a fresh store whose profile "u" holds `n_items` movie ratings (the demo's, repeated
    with later times), as `p2p ask` opens it."""
    from p2p_local.bundle import Bundle
    from p2p_local.encoder import Encoder
    from p2p_local.engine import Engine
    from p2p_local.models import DEFAULT_BASE, prepare_base
    from p2p_local.personalize import Session
    from p2p_local.store import NewItem, Store

    demo = _demo_items()
    store = Store(home / "p2p.sqlite3")
    store.profiles.create_profile("u", task="movielens-rating")
    t0 = demo[0].time or 0.0
    store.profiles.add_items("u", (NewItem(d.input, d.output, t0 + i, d.meta)
                          for i, d in ((i, demo[i % len(demo)]) for i in range(n_items))))
    engine = Engine(prepare_base(DEFAULT_BASE), n_ctx=512, sha256=DEFAULT_BASE.sha256)
    return Session(engine, Bundle.load(), Encoder.load(), store)


def bench_personalize(repeat: int = 15, n_items: int = 0) -> dict:
    """The whole path a user waits for, through `Session.personalize` on a real store: profile ->
    encoder -> hypernetwork -> GGUF -> load + attach, a new question each time (nothing cached)."""
    n_items = n_items or len(_demo_items())
    with tempfile.TemporaryDirectory() as tmp:
        s = _session_with(n_items, Path(tmp))
        try:
            stages: dict[str, list[float]] = {}
            for i in range(repeat + 2):
                r = s.personalize("u", "movielens-rating", query=f"{QUERIES[i % len(QUERIES)]} #{i}", force=True)
                if i < 2:
                    continue  # warm-up (imports, onnxruntime arenas)
                for k, v in r.timings_ms.items():
                    stages.setdefault(k, []).append(v)
        finally:
            s.close()
    out = {f"{k[:-3]}_median_ms": round(statistics.median(v), 2) for k, v in stages.items()}
    out["total_p90_ms"] = round(float(np.percentile(stages["total_ms"], 90)), 2)
    out.update({"profile_items": n_items, "targets": {"total_median_ms": "<= 150"}})
    return out


def bench_chat_rating(repeat: int = 15) -> dict:
    """The chat's rating answer (the text and the label distribution it shows), the way it was and the way
    it is, in one run: `before` answers, then asks the distribution again (a second evaluation of the
    prompt); `after` reads the distribution off the `Answer` (one evaluation). Each round's query is made
    personal first (its adapter cached), so both variants time the same attach + evaluation path; the
    order of the two alternates round by round."""
    from p2p_local import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        s = _session_with(len(_demo_items()), Path(tmp))
        try:
            card = s.card("movielens-rating")

            def before(q: str) -> None:  # the answer, then the prompt evaluated again (the chat's old second read)
                s.answer(q, profile="u", task="movielens-rating").finish()
                with s.lock:
                    pipeline.label_scores(s.engine, pipeline.task_prompt(s.engine, card, q), s.route.label_ids(card))

            def after(q: str) -> None:
                answer = s.answer(q, profile="u", task="movielens-rating").finish()
                assert answer.distribution is not None

            times: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(repeat + 1):
                q = f"{QUERIES[i % len(QUERIES)]} #{i}"
                s.personalize("u", "movielens-rating", query=q)
                order = (("before", before), ("after", after)) if i % 2 else (("after", after), ("before", before))
                for name, fn in order:
                    t = time.perf_counter()
                    fn(q)
                    if i:  # round 0: warm-up
                        times[name].append((time.perf_counter() - t) * 1e3)
        finally:
            s.close()
    out = {f"{k}_median_ms": round(statistics.median(v), 2) for k, v in times.items()}
    out["after_vs_before"] = round(out["after_median_ms"] / out["before_median_ms"], 3)
    out.update({"repeat": repeat, "targets": {"after_vs_before": "< 1"}})
    return out


HISTORY_SIZES = (100, 1_000, 10_000, 100_000)


def bench_history(sizes: tuple[int, ...] = HISTORY_SIZES, repeat: int = 9) -> dict:
    """How cost grows with history size: `Session.personalize` (new question, nothing cached) and a
    rating answer as the chat gives it (`Session.answer`: personalize + the label distribution), at
    100 / 1k / 10k / 100k items. Sizes are interleaved round by round, so machine load hits all alike."""
    sessions = {}
    tmps = [tempfile.TemporaryDirectory() for _ in sizes]
    try:
        for n, tmp in zip(sizes, tmps, strict=True):
            sessions[n] = _session_with(n, Path(tmp.name))
        times: dict[int, dict[str, list[float]]] = {n: {"personalize": [], "profile": [], "answer": []} for n in sizes}
        for i in range(repeat + 1):
            for n, s in sessions.items():
                q = f"{QUERIES[i % len(QUERIES)]} #{i}"
                r = s.personalize("u", "movielens-rating", query=q, force=True)
                t = time.perf_counter()
                "".join(s.answer(q + " ", profile="u", task="movielens-rating"))  # another question: not cached
                if i == 0:
                    continue  # warm-up
                times[n]["personalize"].append(r.timings_ms["total_ms"])
                times[n]["profile"].append(r.timings_ms["profile_ms"])
                times[n]["answer"].append((time.perf_counter() - t) * 1e3)
    finally:
        for s in sessions.values():
            s.close()
        for tmp in tmps:
            tmp.cleanup()
    out: dict = {"sizes": list(sizes), "repeat": repeat}
    for n in sizes:
        for k, v in times[n].items():
            out[f"{k}_median_ms_{n}"] = round(statistics.median(v), 1)
    big, small = sizes[-1], sizes[0]
    out[f"personalize_ratio_{big}_vs_{small}"] = round(out[f"personalize_median_ms_{big}"] / out[f"personalize_median_ms_{small}"], 2)
    out["targets"] = {f"personalize_median_ms_{big}": "<= 150", f"answer_median_ms_{big}": "<= 300"}
    return out


def plot_history(result: dict, path: Path) -> None:
    with pyplot(path.parent) as plt:
        sizes = result["sizes"]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key, label in (("profile", "profile (store read + build)"), ("personalize", "profile -> attached adapter"),
                           ("answer", "rating answer in the chat")):
            ax.plot(sizes, [result[f"{key}_median_ms_{n}"] for n in sizes], marker="o", label=label)
        ax.axhline(150, color="grey", ls=":", lw=1)
        ax.axhline(300, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("items in the profile")
        ax.set_ylabel("median ms (2-core CPU)")
        ax.set_title("Cost against history size (p2p bench history)")
        ax.legend(fontsize=8)
        save(fig, path)


STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# Each task's card `samples` are its fixed query set, asked of the demo profile (a MovieLens user: its adapters
# for the other tasks are made from an empty history, the hypernetwork's population adapter for the task).
STRENGTH_MAX_QUERIES = 8  # samples asked per task (a card holds at most 8)


def strength_queries(cards: dict[str, TaskCard], log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Each task's queries for `bench_strength`: its card's samples; a task without samples is left out,
    with the reason logged."""
    out = {}
    for task, card in cards.items():
        if card.samples:
            out[task] = list(card.samples[:STRENGTH_MAX_QUERIES])
        else:
            log(f"bench strength: {task} left out (its task card has no samples)")
    return out


def bench_strength(strengths: tuple[float, ...] = STRENGTHS) -> dict:
    """The strength control's effect across its range, per task, on a fixed query set, through
    `Session.answer` as the chat calls it. Rating/label tasks: the label distribution's total-variation
    distance from the base model's (`effect`); generation tasks: the share of answers that differ from
    the base model's. Both: the share of answers that differ from the x1 answer."""
    from p2p_local.pipeline import lora_scale

    with tempfile.TemporaryDirectory() as tmp:
        s = _session_with(len(_demo_items()), Path(tmp))
        try:
            tasks = {}
            cards = {task: s.card(task) for task in builtin_cards()}
            for task, queries in strength_queries(cards).items():
                card = cards[task]
                answers: dict[float, list] = {x: [] for x in strengths}
                effect: dict[float, list[float]] = {x: [] for x in strengths}
                for q in queries:
                    base_dist = None
                    for x in strengths:
                        answer = s.answer(q, profile="u", task=task, scale=x, personalized=x > 0)
                        answers[x].append(answer.text)
                        if card.labelled:  # the distribution the answer was read off
                            dist = np.array(list(answer.distribution.values()))
                            base_dist = dist if base_dist is None else base_dist
                            effect[x].append(0.5 * float(np.abs(dist - base_dist).sum()))
                ref, base = answers[1.0], answers[0.0]
                n = len(queries)
                tasks[task] = {
                    "effect_measure": "label distribution's distance from the base (TV)" if card.labelled
                    else "share of answers unlike the base's",
                    "effect": [round(float(np.mean(effect[x])), 3) if effect[x] else
                               round(sum(a != b for a, b in zip(answers[x], base, strict=True)) / n, 3) for x in strengths],
                    "differs_from_x1": [round(sum(a != b for a, b in zip(answers[x], ref, strict=True)) / n, 3)
                                        for x in strengths],
                    "answers": {f"x{x:g}": answers[x] for x in strengths},
                    "queries": n,
                }
        finally:
            s.close()
    return {"strengths": list(strengths), "lora_scales": [round(lora_scale(x), 4) for x in strengths], "tasks": tasks}


def strength_rows(result: dict) -> list[str]:
    """Table rows of `bench_strength`: per task, the effect and the change from x1 at each strength."""
    rows = []
    for task, r in result["tasks"].items():
        for key, what in (("effect", r["effect_measure"]), ("differs_from_x1", "share of answers unlike x1's")):
            curve = ", ".join(f"x{x:g} {v:.2f}" for x, v in zip(result["strengths"], r[key], strict=True))
            rows.append(f"| strength | {task}: {what} | {curve} | |")
    return rows


def plot_strength(result: dict, path: Path) -> None:
    with pyplot(path.parent) as plt:
        tasks = result["tasks"]
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), sharey=True)
        for ax, (task, r) in zip(np.atleast_1d(axes), tasks.items(), strict=True):
            ax.plot(result["strengths"], r["effect"], marker="o", label="effect (vs base)")
            ax.plot(result["strengths"], r["differs_from_x1"], marker="s", ls="--", label="answers unlike x1")
            ax.set_title(task, fontsize=9)
            ax.set_xlabel("strength (xS)")
            ax.set_ylim(-0.02, 1.02)
        np.atleast_1d(axes)[0].set_ylabel("share / TV distance")
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.suptitle("Strength control (p2p bench strength, demo profile)", fontsize=10)
        save(fig, path)


FIRST_TOKEN = r"""
import json, sys, time
t0 = float(sys.argv[1])
from p2p_local.personalize import Session
s = Session.open(n_ctx=1024)
t_open = time.time()
r = s.personalize("demo", "movielens-rating", query="Heat (1995) | Genres: Action|Crime|Thriller", force=True)
stream = s.answer("Heat (1995) | Genres: Action|Crime|Thriller", profile="demo", task="movielens-rating")
next(stream)
t_first = time.time()
for _ in stream: pass
import psutil
print(json.dumps({"open_s": t_open - t0, "first_token_s": t_first - t0, "rss_mb": psutil.Process().memory_info().rss / 2**20}))
"""


def bench_app() -> dict:
    """Start of a fresh process to the first streamed token of a personalized answer; its memory; store import."""
    import json

    from p2p_lab.store_bench import bench_store

    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, P2P_HOME=home)
        from p2p_local.paths import models_dir

        env["P2P_MODELS"] = str(models_dir())
        demo = DEMO
        subprocess.run([sys.executable, "-m", "p2p_local.cli", "profile", "create", "demo", "--task",
                        "movielens-rating"], env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "p2p_local.cli", "profile", "import", "demo", str(demo)],
                       env=env, check=True, capture_output=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", FIRST_TOKEN, str(t0)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        first = json.loads(proc.stdout.strip().splitlines()[-1])
    store = bench_store(100_000)
    return {
        "first_token_s": round(first["first_token_s"], 3),
        "session_open_s": round(first["open_s"], 3),
        "rss_personalized_mb": round(first["rss_mb"], 1),
        **{f"store_{k}": v for k, v in store.items()},
        "targets": {"first_token_s": "<= 3", "rss_personalized_mb": "<= 600"},
    }


def bench_encoder() -> dict:
    from p2p_lab.encoder_bench import bench_encoder as run

    return {**run(), "targets": {"median_ms": "<= 50"}}


def bench_cost(users: int = 3, oppu_max_items: int = 0) -> dict:
    """P2P's whole per-user path vs OPPU's per-user training, side by side (needs the train extra).
    `oppu_max_items` caps OPPU's training items per user (0 = the user's whole history, as the paper)."""
    from p2p_lab.eval.cost import measure_cost

    extra = ["--max-items", str(oppu_max_items)] if oppu_max_items else None
    return measure_cost("movielens-rating", users=users, oppu_extra=extra)


HOOK_REBASE_FILES = (2, 1_000, 10_000)  # files in the rebased repository's tree: a toy, a small project, a large one


def bench_hook_rebase(commits: int = 30, repeat: int = 9, sizes: tuple[int, ...] = HOOK_REBASE_FILES) -> dict:
    """`git rebase` of `commits` commits onto another base (every commit rewritten), in temporary repositories whose
    tree holds `sizes` files: without a prepare-commit-msg hook, with an empty one (`exit 0`: what git's start of any
    hook costs), and with ours (`hook.install`), the three alternating round by round. A rebase hands the hook git's
    message (source `message`): ours must step aside in the shell, so its cost is git's start of a hook, a constant
    per commit that weighs less as git's own work per commit grows with the tree. `python_hook_run_median_ms`: the
    Python start each rewritten commit paid before the script stepped aside in the shell."""
    from p2p_local import hook

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "P2P_HOME"))}
        env.update({"HOME": tmp, "XDG_CONFIG_HOME": tmp, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Bench",
                    "GIT_AUTHOR_EMAIL": "bench@example.org", "GIT_COMMITTER_NAME": "Bench",
                    "GIT_COMMITTER_EMAIL": "bench@example.org", "P2P_HOME": str(Path(tmp) / "p2p-home")})
        Path(env["P2P_HOME"]).mkdir()
        for n in sizes:
            times, cpu, repo = _rebase_times(Path(tmp) / f"repo-{n}", env, n, commits, repeat)
            for key, per in (("rebase_median_ms", times), ("rebase_cpu_median_ms", cpu)):
                out.update({f"{key}_{v}_{n}": round(statistics.median(t), 1) for v, t in per.items()})
            med = {v: out[f"rebase_median_ms_{v}_{n}"] for v in times}
            out[f"with_vs_without_{n}"] = round(med["with_hook"] / med["without_hook"], 3)
            out[f"cpu_with_vs_without_{n}"] = round(out[f"rebase_cpu_median_ms_with_hook_{n}"]
                                                    / out[f"rebase_cpu_median_ms_without_hook_{n}"], 3)
            out[f"with_vs_empty_hook_{n}"] = round(med["with_hook"] / med["empty_hook"], 3)
            out[f"empty_hook_vs_without_{n}"] = round(med["empty_hook"] / med["without_hook"], 3)
            out[f"hook_ms_per_commit_{n}"] = round((med["with_hook"] - med["without_hook"]) / commits, 2)
        msg = repo / ".git" / "MSG"
        msg.write_text("Change\n")
        python_ms = _ms(lambda: subprocess.run(
            [sys.executable, "-c", hook._ENTRY, "hook", "run", "--profile", "bench", str(msg), "message"],
            env=env, cwd=repo, check=True, capture_output=True), 5)
    out["python_hook_run_median_ms"] = round(statistics.median(python_ms), 1)
    out.update({"commits": commits, "repeat": repeat, "tree_files": list(sizes),
                "targets": {f"with_vs_without_{n}": "<= 1.2" for n in sizes}})
    return out


def _rebase_times(repo: Path, env: dict[str, str], n_files: int, commits: int, repeat: int
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]], Path]:
    """Wall and CPU milliseconds of each variant's rebases in a new repository of `n_files` files (round 0, the
    warm-up of the page cache and git's first start, left out)."""
    import resource

    from p2p_local import hook

    variants = ("without_hook", "empty_hook", "with_hook")
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}  # git's and its hooks' CPU: less swayed by a busy machine
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def commit(name: str, message: str) -> None:
        with open(repo / name, "a") as f:
            f.write(message + "\n")
        git("add", name)
        git("commit", "-q", "-m", message)

    git("init", "-q", "-b", "main")
    for i in range(n_files - 1):  # the project's tree: small files, 100 to a folder
        (repo / f"d{i // 100}").mkdir(exist_ok=True)
        (repo / f"d{i // 100}" / f"f{i}.txt").write_text(f"line {i}\n")
    commit("README.md", "Start")
    git("add", "-A")
    git("commit", "-q", "-m", "The tree")
    git("checkout", "-q", "-b", "other")
    commit("other.txt", "Another base")
    git("checkout", "-q", "-b", "topic", "main")
    (repo / "src").mkdir()
    for i in range(commits):
        commit(f"src/f{i % 5}.txt", f"Change {i}")
    tip = git("rev-parse", "HEAD")
    hook_file = hook.hooks_dir(repo) / hook.HOOK

    def rebase(variant: str) -> tuple[float, float]:
        if variant == "with_hook":
            hook.install(repo, "bench", python=sys.executable, env={"P2P_HOME": env["P2P_HOME"]})
        elif variant == "empty_hook":
            hook_file.write_text("#!/bin/sh\nexit 0\n")
            hook_file.chmod(0o755)
        git("checkout", "-q", "-B", "topic", tip)
        r0, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        git("rebase", "-q", "--onto", "other", "main", "topic")
        ms, r1 = (time.perf_counter() - t) * 1e3, resource.getrusage(resource.RUSAGE_CHILDREN)
        hook_file.unlink(missing_ok=True)
        return ms, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3

    for i in range(repeat + 1):
        for variant in (variants if i % 2 else variants[::-1]):
            ms, cpu_ms = rebase(variant)
            if i:
                times[variant].append(ms)
                cpu[variant].append(cpu_ms)
    return times, cpu, repo


HOOK_DIFF_CHARS = (500, 2_000, 8_000)  # staged changes of growing size (characters of `git diff --cached`)


def bench_hook_proposal(repeat: int = 7, sizes: tuple[int, ...] = HOOK_DIFF_CHARS) -> dict:
    """The hook's proposal latency, as a user waits for it: `git commit` in a temporary repository whose
    author's 24 earlier commits are the profile, with the hook installed and an editor that accepts; the
    staged change is a file of about `size` diff characters (sizes interleaved, `repeat` rounds). Also the
    same change through `p2p ask -` (one process too) and the in-process answer alone (`hook.propose`, the
    model already loaded), to say where the time goes."""
    from p2p_local import hook
    from p2p_local.personalize import Session

    per: dict[int, dict[str, list[float]]] = {n: {"git_commit": [], "ask_cli": [], "answer_in_process": []}
                                              for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        repo, home = Path(tmp) / "repo", Path(tmp) / "p2p-home"
        repo.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update({"HOME": tmp, "XDG_CONFIG_HOME": tmp, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Bench",
                    "GIT_AUTHOR_EMAIL": "bench@example.org", "GIT_COMMITTER_NAME": "Bench",
                    "GIT_COMMITTER_EMAIL": "bench@example.org", "P2P_HOME": str(home), "GIT_EDITOR": "true"})
        from p2p_local.paths import models_dir

        env["P2P_MODELS"] = str(models_dir())  # the prepared models, resolved before the home moves
        old_home, old_models = os.environ.get("P2P_HOME"), os.environ.get("P2P_MODELS")
        os.environ.update(P2P_HOME=str(home), P2P_MODELS=env["P2P_MODELS"])

        def git(*args: str, stdin: str | None = None) -> str:
            return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True,
                                  text=True, input=stdin).stdout

        git("init", "-q", "-b", "main")
        (repo / "src").mkdir()
        for i in range(24):  # the author's history: small changes to a handful of modules
            (repo / "src" / f"mod{i % 6}.py").write_text("".join(f"def f{i}_{k}(x):\n    return x + {k}\n" for k in range(i % 4 + 1)))
            git("add", "-A")
            git("commit", "-q", "-m", f"{('add', 'fix', 'update')[i % 3]} helpers of mod{i % 6} ({i})")
        try:
            from p2p_local.cli import main as p2p

            p2p(["profile", "import", "bench", "--git", str(repo), "--author", "bench@example.org", "--create"])
            hook.install(repo, "bench", timeout=600, env={"P2P_HOME": str(home), "P2P_MODELS": env["P2P_MODELS"]})
            base = git("rev-parse", "HEAD").strip()

            def stage(size: int, round_: int) -> None:
                git("reset", "-q", "--hard", base)
                lines, n = [], 0
                while n < size:  # added lines, ~40 characters each in the diff
                    lines.append(f"value_{round_}_{len(lines)} = compute({len(lines)})\n")
                    n += len(lines[-1]) + 1
                (repo / "src" / "new_module.py").write_text("".join(lines))
                git("add", "-A")

            s = Session.open()
            try:
                for r in range(repeat + 1):
                    for size in (sizes if r % 2 else sizes[::-1]):
                        stage(size, r)
                        diff = git("diff", "--cached")
                        t = time.perf_counter()
                        git("commit", "-q")
                        commit_ms = (time.perf_counter() - t) * 1e3
                        stage(size, r)
                        t = time.perf_counter()
                        subprocess.run([sys.executable, "-m", "p2p_local.cli", "ask", "-", "--profile", "bench",
                                        "--task", "commit-subject", "--candidates", "3"], input=diff, env=env,
                                       check=True, capture_output=True, text=True)
                        ask_ms = (time.perf_counter() - t) * 1e3
                        t = time.perf_counter()
                        s.answer(diff, profile="bench", task="commit-subject").finish()
                        answer_ms = (time.perf_counter() - t) * 1e3
                        if r:  # round 0: warm-up
                            per[size]["git_commit"].append(commit_ms)
                            per[size]["ask_cli"].append(ask_ms)
                            per[size]["answer_in_process"].append(answer_ms)
            finally:
                s.close()
        finally:
            for key, old in (("P2P_HOME", old_home), ("P2P_MODELS", old_models)):
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old
    out: dict = {"sizes": list(sizes), "repeat": repeat}
    for size, d in per.items():
        for k, v in d.items():
            out[f"{k}_p50_ms_{size}"] = round(statistics.median(v), 1)
            out[f"{k}_p90_ms_{size}"] = round(float(np.percentile(v, 90)), 1)
    out["targets"] = {"git_commit_p50_ms_2000": "<= 2500"}
    return out


SUITES: dict[str, Callable[[], dict]] = {
    "runtime": bench_runtime,
    "personalize": bench_personalize,
    "history": bench_history,
    "chat-rating": bench_chat_rating,
    "encoder": bench_encoder,
    "app": bench_app,
    "strength": bench_strength,
    "hook-rebase": bench_hook_rebase,
    "hook-proposal": bench_hook_proposal,
    "cost": bench_cost,  # minutes (OPPU trains per user): not part of `all`
}
ALL = ("runtime", "personalize", "history", "chat-rating", "encoder", "app", "strength")


def table(results: dict[str, dict]) -> str:
    lines = ["| suite | figure | value | target |", "| --- | --- | --- | --- |"]
    for suite, figures in results.items():
        if suite == "machine":
            continue
        if suite == "strength":
            lines += strength_rows(figures)
            continue
        targets = figures.get("targets", {})
        for k, v in figures.items():
            if k != "targets" and not isinstance(v, dict):
                lines.append(f"| {suite} | {k} | {v} | {targets.get(k, '')} |")
    return "\n".join(lines)
