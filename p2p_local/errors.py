"""One exception family, so the CLI can print a clear message and exit with a meaningful code.

Every error carries a `hint`: what the user should do next.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base class. `exit_code` is what the CLI exits with; `default_hint` is the hint when the raiser gave none.
    A subclass declares both in its header: `class ModelError(P2PError, exit_code=3, hint="...")`."""

    exit_code = 1
    default_hint: str | None = None

    def __init_subclass__(cls, exit_code: int | None = None, hint: str | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        cls.exit_code = cls.exit_code if exit_code is None else exit_code  # a sub-subclass inherits both
        cls.default_hint = hint or cls.default_hint

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class UsageError(P2PError, exit_code=2, hint="see `p2p COMMAND --help` for the arguments it takes"):
    """A command-line argument is invalid (bad value, out of range, wrong shape)."""


class ModelError(P2PError, exit_code=3, hint="run `p2p models list` to see which base models are ready"):
    """A base model file is missing, corrupt, or not the one expected."""


class AdapterError(P2PError, exit_code=4, hint="regenerate the adapter with `p2p personalize NAME --force`"):
    """A LoRA adapter file is corrupt or does not fit the loaded base model."""


class BundleError(P2PError, exit_code=5, hint="use the bundle shipped in models/ or re-export it with `make export`"):
    """A hypernetwork bundle is missing, corrupt, or made for another base model / encoder."""


class DataError(P2PError, exit_code=6, hint="fix the value at the place named and run the command again"):
    """Malformed user data (imports, dataset files)."""


class StoreError(P2PError, exit_code=7, hint="see `p2p profile list`; the store was left as it was"):
    """The profile store cannot do what was asked (unknown profile, ...)."""


class EngineError(P2PError, exit_code=8,
                  hint="check the base model with `p2p models list`; set P2P_DEBUG=1 for details"):
    """llama.cpp failed (load, decode)."""


class InternalError(P2PError, exit_code=70):  # EX_SOFTWARE (sysexits.h): an internal software error
    """An unexpected exception caught by the CLI's top-level guard (a bug in p2p-local)."""
