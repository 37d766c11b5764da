"""Where p2p-local keeps its files. Everything a user owns lives under one data directory.

`P2P_HOME` overrides the location (tests and portable installs); otherwise the XDG/OS data dir.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import platformdirs

from p2p_local.errors import P2PError, StoreError

APP_NAME = "p2p-local"


def data_dir(create: bool = True) -> Path:
    """The root of everything p2p-local writes (profiles, adapters, prepared models); `create=False` only
    names it (a dry run writes nothing, not even the folder)."""
    env = os.environ.get("P2P_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP_NAME))
    if not create:
        return root
    try:
        private_dir(root)  # profiles are private: only the user reads them, whatever mode the dir had
    except OSError as e:
        raise StoreError(f"cannot create the data dir {root}: {e.strerror or e}",
                         hint="set P2P_HOME to a writable directory") from None
    _tighten_once(root)
    return root


_tightened: set[Path] = set()


def _tighten_once(root: Path) -> None:
    """Once per process: folders of the data dir 0700 and files 0600, also those an older version made
    0755/0644 (logs/, adapters/profile-N). A shared models dir (P2P_MODELS) lives elsewhere and is left alone."""
    if root in _tightened:
        return
    _tightened.add(root)
    for folder, dirs, files in os.walk(root):  # never follows symlinks into other places
        for name in dirs:
            _private(Path(folder) / name)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):  # a link's target is not ours to change
                _private(Path(folder) / name, 0o600)


def models_dir() -> Path:
    """Prepared base models and the profile encoder (`P2P_MODELS` overrides: share one copy)."""
    return _sub("models", env="P2P_MODELS")


ADAPTERS = "adapters"  # the adapter cache's folder, beside the store (`AdapterCache.adapter_dir`)


def adapters_dir() -> Path:
    """Cached per-profile GGUF adapters (of the data dir's store)."""
    return _sub(ADAPTERS)


def cache_dir() -> Path:
    """Derived, re-creatable files (converted datasets, de-quantized weights); `P2P_CACHE` overrides."""
    return _sub("cache", env="P2P_CACHE")


def store_path(create: bool = True) -> Path:
    """The SQLite profile store (`create=False`: its path, without making the data dir)."""
    return data_dir(create) / "p2p.sqlite3"


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
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {p}: {e.strerror or e}",
                         hint="the data dir is read-only or full: make it writable, or set P2P_HOME") from None
    if not override:
        _private(p)  # an override (a shared models dir) is the user's to set up
    return p


def private_dir(d: Path) -> Path:
    """Create `d` (and missing parents) 0700 and make an existing one 0700: a folder of the data dir
    holds profile data (adapters, exports, crash logs), whatever the umask. OSError passes to the caller."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(d)
    return d


def _private(d: Path, mode: int = 0o700) -> None:
    """0700 for a folder we own (also one made 0755 before), `mode` for a file; a read-only one is left as is."""
    try:
        if d.stat().st_mode & 0o077:
            d.chmod(mode)
    except OSError:
        pass  # not ours to change (read-only mount, another owner): reading still works


def regular_file(path: str | Path, what: str, max_bytes: int, error: type[P2PError]) -> Path:
    """`path` if it is a readable regular file of at most `max_bytes`, else `error` saying which.

    Why: reading a FIFO blocks forever, `/dev/zero` never ends, and a directory fails deep inside a
    parser. One check before any open, for every file the user hands us.
    """
    p = Path(path)
    try:
        st = p.stat()  # follows symlinks: a link to a regular file is fine
    except FileNotFoundError:
        raise error(f"{what} not found: {p}", hint="check the path") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}", hint="check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a directory, not a file", hint="give the path of a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file (a pipe, socket or device)",
                    hint="save it to a file first and pass that file")
    if st.st_size > max_bytes:
        raise error(f"{what} {p} is too large ({st.st_size:,} bytes, at most {max_bytes:,})",
                    hint="split it into smaller files")
    if not os.access(p, os.R_OK):
        raise error(f"cannot read {what} {p}: permission denied", hint="check its permissions")
    return p
