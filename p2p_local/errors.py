"""One exception family, so the CLI can print a clear message and exit with a meaningful code.

Every error carries a `hint`: what the user should do next.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1
    default_hint: str | None = None  # what to do when the raiser gave no specific hint

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class ModelError(P2PError):
    """A base model file is missing, corrupt, or not the one expected."""

    exit_code = 3
    default_hint = "run `p2p models list` to see which base models are ready"


class AdapterError(P2PError):
    """A LoRA adapter file is corrupt or does not fit the loaded base model."""

    exit_code = 4
    default_hint = "regenerate the adapter with `p2p personalize NAME --force`"


class BundleError(P2PError):
    """A hypernetwork bundle is missing, corrupt, or made for another base model / encoder."""

    exit_code = 5
    default_hint = "use the bundle shipped in models/ or re-export it with `make export`"


class DataError(P2PError):
    """Malformed user data (imports, dataset files)."""

    exit_code = 6
    default_hint = "fix the value at the place named and run the command again"


class StoreError(P2PError):
    """The profile store cannot do what was asked (unknown profile, ...)."""

    exit_code = 7
    default_hint = "see `p2p profile list`; the store was left as it was"


class EngineError(P2PError):
    """llama.cpp failed (load, decode)."""

    exit_code = 8
    default_hint = "check the base model with `p2p models list`; set P2P_DEBUG=1 for details"


class UsageError(P2PError):
    """A command-line argument is invalid (bad value, out of range, wrong shape)."""

    exit_code = 2
    default_hint = "see `p2p COMMAND --help` for the arguments it takes"


class InternalError(P2PError):
    """An unexpected exception caught by the CLI's top-level guard (a bug in p2p-local)."""

    exit_code = 70  # EX_SOFTWARE (sysexits.h): an internal software error
