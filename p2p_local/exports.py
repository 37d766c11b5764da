"""Names and places of what `p2p adapter export` (and the chat's export key) writes: the exporter names
files with `export_name`, `forget` finds a profile's exports with `profile_exports`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

# The files of one GGUF export (`<stem>.gguf` + README + Modelfile); a PEFT export is the folder `<stem>`.
EXPORT_SUFFIXES = (".gguf", ".README.md", ".Modelfile", "")
_QUERY_TAG = r"-q[0-9a-f]{8}"  # what `export_name` adds for a query


def export_name(profile: str, task: str, query: str | None) -> str:
    """`<profile>-<task>`, plus a short hash of the query for a query-aware adapter: the same profile,
    task and query always give the same name (re-exporting replaces the file), and two profiles never
    share one. Profile names may be any letters (`\\w`), file names here are ASCII, so a name that is not
    plain lower-case ASCII gets a hash of the exact name: two that differ only outside ASCII (or only in
    case, on a case-insensitive disk) would otherwise share a file and the second export replace the first."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", profile).strip("._") or "profile"
    if safe != profile or profile != profile.lower():
        safe += "-" + hashlib.sha256(profile.encode("utf-8")).hexdigest()[:8]
    name = f"{safe}-{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}"
    if query:
        name += "-q" + hashlib.sha256(query.encode("utf-8")).hexdigest()[:8]
    return name


def profile_exports(folder: Path, profile: str, tasks: Iterable[str]) -> list[Path]:
    """The exports of `profile` (any of `tasks`, with or without a query) found in `folder`."""
    stems = "|".join(re.escape(export_name(profile, t, None)) for t in tasks if t)
    if not stems or not folder.is_dir():
        return []
    ours = re.compile(f"(?:{stems})(?:{_QUERY_TAG})?(?:{'|'.join(map(re.escape, EXPORT_SUFFIXES))})")
    return sorted(p for p in folder.iterdir() if ours.fullmatch(p.name))
