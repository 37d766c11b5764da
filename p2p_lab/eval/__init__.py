"""Evaluation: every method on the same held-out users, bootstrap CIs over users, reports.

    from p2p_lab.eval import EvalConfig, run_eval
    out = run_eval(EvalConfig(task="movielens-rating", methods=["base", "user-mean"], users=20))

Modules: methods.py (one class per method), runner.py (queries, resumable runs), stats.py (scores,
bootstrap), report.py (JSON / Markdown / chart), cost.py (P2P vs OPPU deployment cost).
"""

from p2p_lab.eval.methods import METHODS, MethodOptions, default_methods
from p2p_lab.eval.runner import EvalConfig, RunOutput, run_eval

__all__ = ["METHODS", "EvalConfig", "MethodOptions", "RunOutput", "default_methods", "run_eval"]
