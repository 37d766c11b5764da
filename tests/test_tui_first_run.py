"""First run and reopening, driven by Textual's pilot at 80x24 and 160x48: the first-run screen shows
once while only the demo exists, says what esc does on a first run, keeps its forms inside the dialog
(keys land in a visible field), the chat's footer keeps ^q quit, and `p2p chat --profile demo` opens on
the profile's task whatever the last conversation ended with."""

from __future__ import annotations

import pytest
from textual.geometry import Region
from textual.widgets import Footer, Input

from p2p_local.demo import DEMO_PROFILE
from p2p_local.tui import ChatApp
from p2p_local.tui.chat_screen import FREE_CHAT, ChatScreen
from p2p_local.tui.first_run_screen import FirstRunScreen
from tests.test_tui import chat, fake, send, store, until  # noqa: F401  (fixtures)

SIZES = [(80, 24), (160, 48)]


def _inside(inner: Region, outer: Region) -> bool:
    return outer.contains_region(inner)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_first_run_forms_stay_inside_the_dialog(fake, store, size):  # noqa: F811
    app = ChatApp(fake, profile=DEMO_PROFILE)
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen), "the first-run screen")
        await pilot.pause()
        screen = app.screen
        title = str(screen.query_one("Label").render())
        assert "esc: chat with the demo for now" in title and "as before" not in title
        dialog = screen.query_one("#first-run")
        screen_region = Region(0, 0, *size)
        for key, field in (("g", "#git-path"), ("escape", None), ("f", "#file-path")):
            await pilot.press(key)
            await pilot.pause()
            if field is None:
                continue
            inp = screen.query_one(field, Input)
            assert screen.focused is inp
            assert _inside(inp.region, dialog.content_region) and _inside(inp.region, screen_region), (
                size, field, inp.region, dialog.content_region)
            await pilot.press("x")
            assert inp.value.endswith("x")  # the key landed in the field the user sees
        await pilot.press("tab")  # on to the profile name, scrolled into view
        await pilot.pause()
        name = screen.query_one("#profile-name", Input)
        assert screen.focused is name and _inside(name.region, dialog.content_region), (size, name.region)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", SIZES)
async def test_first_run_screen_shows_once_and_quit_stays_in_the_footer(fake, store, size):  # noqa: F811
    app = ChatApp(fake, profile=DEMO_PROFILE)
    async with app.run_test(size=size) as pilot:
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen), "the first-run screen")
        await pilot.press("escape")  # "chat with the demo for now"
        await until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat")
        assert chat(app).profile == DEMO_PROFILE
        keys = {k.key: k for k in app.screen.query_one(Footer).query("FooterKey")}
        quit_key = keys["ctrl+q"]
        assert quit_key.region.right <= size[0] and quit_key.region.width > 0, quit_key.region
    again = ChatApp(fake, profile=DEMO_PROFILE)  # still only the demo, but the screen was answered
    assert not again.first_run
    async with again.run_test(size=size) as pilot:
        await pilot.pause(0.3)
        assert isinstance(again.screen, ChatScreen)
        chat(again).action_import()  # the palette's "Import history" still opens it, as an import
        await until(pilot, lambda: isinstance(again.screen, FirstRunScreen), "the import screen")
        await pilot.pause()
        title = str(again.screen.query_one("Label").render())
        assert "Import history" in title and "esc: back" in title


@pytest.mark.asyncio
async def test_chat_profile_opens_on_the_profiles_task_not_the_last_conversations(fake, store):  # noqa: F811
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE, task=FREE_CHAT)
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, "what should I watch tonight?")  # the last conversation ends in free chat
        conv = chat(app).conversation_id
    app = ChatApp(fake, first_run=False, profile=DEMO_PROFILE)  # `p2p chat --profile demo`
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.3)
        assert chat(app).conversation_id == conv  # resumed ...
        assert chat(app).task_name == "movielens-rating"  # ... on the profile's task, as --help says
