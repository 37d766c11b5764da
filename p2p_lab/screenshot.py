"""Make the README screenshot: the demo profile, side by side, two questions, on the real model.

    python -m p2p_lab.screenshot --out docs/chat.svg      # also writes docs/chat.png if cairosvg is installed

Runs headless in a throwaway data dir (your own profiles and conversations are not touched).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path


def svg_to_png(svg: Path, png: Path, width: int = 1400) -> bool:
    """Render with cairosvg (optional). Textual's SVG asks for the Fira Code web font, which an
    offline renderer cannot fetch; DejaVu Sans Mono keeps the terminal grid. False if cairosvg is missing."""
    try:
        import cairosvg
    except ImportError:
        return False
    text = svg.read_text(encoding="utf-8").replace("font-family: Fira Code, monospace;",
                                                   'font-family: "DejaVu Sans Mono", monospace;')
    cairosvg.svg2png(bytestring=text.encode("utf-8"), write_to=str(png), output_width=width)
    return True


async def capture(out: Path, size: tuple[int, int], questions: list[str]) -> None:
    from p2p_local.demo import import_demo
    from p2p_local.personalize import Session
    from p2p_local.tui import ChatApp
    from p2p_local.tui.widgets import ChatInput

    session = Session.open()
    try:
        profile = import_demo(session.store)
        app = ChatApp(session, first_run=False, profile=profile, compare=True, resume=False)
        async with app.run_test(size=size) as pilot:
            screen = app.chat
            for q in questions:
                screen.query_one(ChatInput).load_text(q)
                await pilot.press("enter")
                while screen.busy or screen.query(".streaming"):
                    await pilot.pause(0.1)
            await app.workers.wait_for_complete()  # the status line's adapter note
            await pilot.pause(0.3)
            app.save_screenshot(out.name, path=str(out.parent))
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    from p2p_local import paths
    from p2p_local.demo import DEMO_QUESTIONS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/chat.svg"))
    ap.add_argument("--size", default="110x28", help="terminal columns x rows")
    args = ap.parse_args(argv)
    cols, rows = (int(x) for x in args.size.split("x"))
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("P2P_MODELS", str(paths.models_dir()))  # the prepared models stay where they are
    with tempfile.TemporaryDirectory(prefix="p2p-screenshot-") as home:
        os.environ["P2P_HOME"] = home
        asyncio.run(capture(out, (cols, rows), list(DEMO_QUESTIONS)))
    png = out.with_suffix(".png")
    print(out, png if svg_to_png(out, png) else "(no PNG: pip install cairosvg)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
