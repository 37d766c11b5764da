"""`p2p eval | bench | data`: registered with the `p2p` CLI through entry points (see setup.cfg).

These commands need the `lab` extra (scikit-learn, rouge-score, matplotlib), which `make chat` does not
install. In an install without it each command still appears, marked, and says how to get the extra
(exit 2) instead of failing deep inside with a missing module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from p2p_local.commands.args import missing_modules
from p2p_local.errors import UsageError

# The import names of the `lab` extra's packages (setup.cfg [options.extras_require] lab).
LAB_MODULES = ("sklearn", "rouge_score", "matplotlib")
LAB_HINT = ("install the lab extra: `make data`, `make bench` or `make eval` do it, "
            "or run `pip install -e '.[lab]'` in the p2p-local checkout")


def missing_lab_modules() -> list[str]:
    """The lab extra's modules this interpreter cannot import (found without importing them)."""
    return missing_modules(LAB_MODULES)


def needs_lab(name: str, help: str) -> Callable[[Callable[[argparse._SubParsersAction], None]],
                                              Callable[[argparse._SubParsersAction], None]]:
    """Wrap a command's `register`: without the lab extra, register a stand-in that says how to get it."""
    def wrap(register: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
        def guarded(sub: argparse._SubParsersAction) -> None:
            missing = missing_lab_modules()
            if not missing:
                register(sub)
                return
            # Every word after the command (options and --help too) is taken as is: the answer is the same.
            p = sub.add_parser(name, help=f"[needs the lab extra] {help}",
                               prefix_chars="\x01", add_help=False)
            p.add_argument("args", nargs="*")

            def refuse(args: argparse.Namespace) -> int:
                raise UsageError(f"`p2p {name}` needs the lab extra, which is not installed "
                                 f"({', '.join(missing)} missing)", hint=LAB_HINT)

            p.set_defaults(func=refuse)
        return guarded
    return wrap
