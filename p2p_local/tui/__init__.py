"""The terminal chat (Textual). `ChatApp(session, profile=..., task=...).run()`; see app.py.

`ChatApp` is imported on first use: `p2p ask` and the commit hook read `tui.titles` and must not pay for
importing Textual at every start (tests/test_import_graph.py keeps it off that path)."""

from typing import Any

__all__ = ["ChatApp"]


def __getattr__(name: str) -> Any:
    if name == "ChatApp":
        from p2p_local.tui.app import ChatApp

        return ChatApp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
