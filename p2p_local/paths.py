"""Where p2p-local keeps its files. Everything a user owns lives under one data directory.

`P2P_HOME` overrides the location (tests and portable installs); otherwise the XDG/OS data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "p2p-local"


def data_dir() -> Path:
    """The root of everything p2p-local writes (profiles, adapters, prepared models)."""
    env = os.environ.get("P2P_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP_NAME))
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)  # profiles are private: only the user reads them
    return root


def models_dir() -> Path:
    """Prepared base models and the profile encoder (`P2P_MODELS` overrides: share one copy)."""
    return _sub("models", env="P2P_MODELS")


def adapters_dir() -> Path:
    """Cached per-profile GGUF adapters."""
    return _sub("adapters")


def cache_dir() -> Path:
    """Derived, re-creatable files (converted datasets, de-quantized weights); `P2P_CACHE` overrides."""
    return _sub("cache", env="P2P_CACHE")


def store_path() -> Path:
    """The SQLite profile store."""
    return data_dir() / "p2p.sqlite3"


def repo_root() -> Path:
    """The source checkout (for bundled models/ and ../shared/data during development)."""
    return Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The real per-user data, read in place (never copied into the repo)."""
    env = os.environ.get("P2P_SHARED_DATA")
    return Path(env) if env else repo_root().parent / "shared" / "data"


def _sub(name: str, env: str | None = None) -> Path:
    override = os.environ.get(env) if env else None
    p = Path(override).expanduser() if override else data_dir() / name
    p.mkdir(parents=True, exist_ok=True)
    return p
