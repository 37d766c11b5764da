"""The terminal chat (Textual). `ChatApp(session, profile=..., task=...).run()`; see app.py."""

from p2p_local.tui.app import ChatApp

__all__ = ["ChatApp"]
