"""`profile forget` racing an answer (issue 28): a profile's changes are serialized (`Store.profile_lock`), so no
adapter file, cache row or export made from a forgotten profile survives the forget, in whichever order the
steps fall. The replays put the forget at the worst moment: after the answer wrote its adapter file, before it
recorded it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from p2p_local import paths, pipeline
from p2p_local.store import Store

TASK = "movielens-rating"
Q = "Heat (1995) | Genres: Action|Crime|Thriller"


def leftovers() -> list[Path]:
    root = paths.adapters_dir()
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def test_forget_while_the_adapter_is_written_leaves_nothing(session, monkeypatch):
    """The forget starts (another thread, its own store connection) the moment the answer's adapter file is
    written: it waits for the answer to record the file, then removes file and row."""
    real = pipeline.Personalizer.write_tensors
    forget: dict = {}

    def write_then_forget(self, tensors, path, fingerprint, card=None):
        real(self, tensors, path, fingerprint, card)
        if "thread" not in forget:
            def run():
                with Store() as s:
                    forget["report"] = s.forget_profile("demo")
            forget["thread"] = threading.Thread(target=run)
            forget["thread"].start()
            time.sleep(0.5)  # without the lock the forget is done by now, before the file is recorded
            forget["waited"] = forget["thread"].is_alive()

    monkeypatch.setattr(pipeline.Personalizer, "write_tensors", write_then_forget)
    answer = session.answer(Q, profile="demo", task=TASK)
    assert answer.text  # the answer itself completes (its adapter is loaded in memory)
    forget["thread"].join(30)
    assert forget["waited"], "the forget did not wait for the adapter being written"
    assert forget["report"].adapters == 1 and forget["report"].files_removed >= 1
    assert not Store().profiles.profile_exists("demo")
    assert leftovers() == []


def test_an_answer_after_the_forget_writes_nothing(session):
    with Store() as s:
        s.forget_profile("demo")
    try:
        session.answer(Q, profile="demo", task=TASK).finish()
    except Exception as e:  # a clean "no profile named 'demo'", never a file of the forgotten profile
        assert "no profile named" in str(e)
    assert leftovers() == []


def test_forget_in_another_process_waits_for_the_profiles_lock(p2p_home):
    """The lock holds across processes: `p2p profile forget` waits while this process holds the profile's lock
    (as an answer writing its adapter does), and completes once it is released."""
    from p2p_local.demo import import_demo

    with Store() as s:
        import_demo(s, "demo")
        with s.profile_lock("demo"):
            proc = subprocess.Popen([sys.executable, "-m", "p2p_local.cli", "profile", "forget", "demo", "--yes"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(2.0)
            assert proc.poll() is None, proc.communicate()
            assert s.profiles.profile_exists("demo")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "forgot 'demo'" in out and not s.profiles.profile_exists("demo")
