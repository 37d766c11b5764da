"""How long embedding one typical profile takes (the device's MiniLM ONNX encoder)."""

from __future__ import annotations

import os
import statistics
import time

from p2p_local.encoder import Encoder, prepare_encoder

# A typical profile as the profile builder writes it: task line, summary, two retrieved items (~200 pieces).
TYPICAL_PROFILE = (
    "Extract personalization features relevant to: predict the rating (1-5) this user gives a movie.\n"
    "Summary: 142 ratings, mean 3.6 (sd 0.9). Rates dramas and crime films highest (mean 4.1 over 38 "
    "films), comedies lower (3.2 over 41). Prefers 1990s films; rarely gives 5 stars (9%) and almost "
    "never 1 star. Favourite genres: Drama, Crime, Thriller, War. Least liked: Horror, Children, Musical. "
    "Recent ratings are slightly harsher than early ones.\n"
    "Label frequencies: 1: 2%, 2: 11%, 3: 29%, 4: 49%, 5: 9%.\n"
    "Related history:\n"
    "- Movie: Heat (1995) | Genres: Action|Crime|Thriller -> 4\n"
    "- Movie: Casino (1995) | Genres: Crime|Drama -> 5\n"
    "- Movie: The Usual Suspects (1995) | Genres: Crime|Mystery|Thriller -> 4\n"
    "- Movie: Jumanji (1995) | Genres: Adventure|Children|Fantasy -> 2\n"
)


def bench_encoder(n: int = 50) -> dict:
    """Time embedding one typical profile (one chunk), as a user waits for it. Milliseconds."""
    prepare_encoder()
    t0 = time.perf_counter()
    enc = Encoder.load()
    load_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(3):  # warm-up: first runs allocate and pick kernels
        enc.embed([TYPICAL_PROFILE])
    times, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        enc.embed([TYPICAL_PROFILE])
        times.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    times.sort()
    return {
        "encoder": enc.id,
        "tokens": enc.count_tokens(TYPICAL_PROFILE) + 2,
        "threads": os.cpu_count(),
        "n": n,
        "load_ms": round(load_ms, 1),
        "median_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[min(n - 1, int(0.9 * n))], 2),
        "min_ms": round(times[0], 2),
        # CPU time summed over threads: less sensitive than wall time to other processes on the machine
        "cpu_ms_median": round(statistics.median(cpu), 2),
    }
