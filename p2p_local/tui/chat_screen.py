"""The main chat screen: messages, the input, and every key that steers personalization.

Replies stream from a thread worker (llama.cpp blocks): pieces are collected in the thread and handed
to the UI at most every FLUSH_S seconds, so typing stays responsive whatever the token rate.
Esc or Ctrl-C cancels (as in oterm and a shell): the worker notices between pieces and closes the generator,
which stops llama.cpp; the partial reply stays, marked as stopped. Store writes happen on the UI thread, and
session calls go through `ChatApp.session_call` (a sqlite3 connection belongs to the thread that opened it).
A bare movie title is completed (titles.py) before it is sent.

Each reply names the model that answered (task answers: the bundle's base; free chat: the chat model picked
with F2 or `--model`, if any), and a change of model within a conversation leaves a note in it. A conversation
keeps its own title, system prompt (free chat) and strength (store: `conversations`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual.worker import Worker, get_current_worker

from p2p_local.bundle import untrained_note
from p2p_local.data.format import FREE_CHAT, resolve_task
from p2p_local.errors import StoreError
from p2p_local.pipeline import Answer, cut_mark, stop_strings
from p2p_local.terminal import shown
from p2p_local.tui.ask_screen import AskScreen
from p2p_local.tui.chat_export import cut_reason, export_conversation
from p2p_local.tui.first_run_screen import FirstRunScreen, mark_first_run_done, own_profiles
from p2p_local.tui.history_screen import HistoryScreen, ask_delete, ask_rename
from p2p_local.tui.picker_screen import PickerScreen
from p2p_local.tui.profile_screen import FORGOTTEN, ProfileScreen
from p2p_local.tui.session import AdapterResult, answering_model, error_text, free_chat_mode, untrained_task
from p2p_local.tui.titles import Catalogue, Movie, needs_completion
from p2p_local.tui.widgets import ChatInput, ComparePair, MessageView, StatusBar

FLUSH_S = 0.05  # hand streamed text to the UI at most this often
SCALE_STEP, SCALE_MAX = 0.25, 2.0
FREE_CHAT_LABEL = "free chat"  # the task picker's name for FREE_CHAT (one of FREE_CHAT_NAMES: `resolve_task` reads it)
# A base model continuing "User: ... Assistant:" may write the next turns itself: free chat ends there too.
FREE_CHAT_STOPS = ("\nAssistant:",)
AS_TYPED = "(send as typed)"
INPUT_KEYS = "⏎ send · ^j new line · ↑ earlier prompts"  # first in the placeholder: narrow terminals show it


@dataclass
class Job:
    """One reply to stream into one message view."""

    view: MessageView
    conversation_id: int
    text: str
    profile: str | None
    task: str  # a task card name, or FREE_CHAT
    personalized: bool
    scale: float
    transcript: list[tuple[str, str]] | None  # free chat: earlier (role, text) turns
    stops: tuple[str, ...]  # the route's (`stop_strings`): kept off screen while a half-typed one may arrive
    meta: dict[str, Any] = field(default_factory=dict)
    dist: bool = False  # a rating/label reply: also read the label distribution (the bar chart)
    system: str = ""  # free chat: the conversation's system prompt
    base: str = ""  # the session's base model (a reply from another one came from the chat model)


def visible_text(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """What may be shown of `text` so far: cut at the first stop string (-> True), and hold back a
    tail that could still become one (so a half-arrived "\\nUse" never flashes on screen)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


def reply_title(meta: dict[str, Any]) -> str:
    """A reply's title line: how it was answered, by which model, for whom, how long, and how it was cut."""
    mode = meta.get("mode", "base")
    kind = "chat model" if meta.get("chat_model") else "base model"  # the chosen instruct model, or the base
    personal = mode == "personalized" and not meta.get("empty")
    if meta.get("empty"):  # no items of the task in the profile: no adapter (the route's rule)
        title = "base model · no items of this task in the profile"
    elif mode != "personalized":
        title = kind
    elif meta.get("free_chat") == "summary":
        title = f"{kind} + your profile summary"  # free chat attaches no task adapter: never claim one
    else:
        title = f"personalized ×{meta.get('scale') or 1.0:.2f}"
    if meta.get("model"):
        title += f" · {shown(str(meta['model']))}"
    if meta.get("profile") and personal:
        title += f" · {meta['profile']}"
    if meta.get("seconds") is not None:
        title += f" · {meta['seconds']:.1f} s"
    reason = cut_reason(meta)
    if reason:
        title += " · stopped" if reason == "stopped" else f" · cut: {reason}"
    if meta.get("error"):
        title += " · error"
    return title


class ChatScreen(Screen):
    """Chat with the base model, personalized by the current profile's adapter."""

    BINDINGS = [
        # The footer holds what fits 80 columns beside the input's ⏎/^j and ^p palette (tests/test_chat_ux.py);
        # the app's ^q is listed first here so that it is always among them.
        Binding("ctrl+q", "app.quit", "quit"),
        Binding("escape", "stop", "stop"),  # shown while an answer streams (in place of ⏎ send)
        # Ctrl-C stops an answer too, before the input's copy; with nothing streaming it is Textual's own
        # ("press ^q to quit"). Priority: the input (focused) would take it first.
        Binding("ctrl+c", "stop", "stop", show=False, priority=True),
        Binding("ctrl+t", "pick_task", "task"),
        Binding("f2", "pick_model", "model", key_display="F2"),
        Binding("ctrl+g", "toggle_personal", "personal"),
        Binding("ctrl+b", "toggle_compare", "compare"),
        # In the welcome note, the status line and the command palette (ctrl+p): the footer is full.
        Binding("ctrl+r", "pick_profile", "switch", show=False),
        Binding("ctrl+o", "open_profile", "profile", show=False),
        Binding("ctrl+up,alt+up", "scale(1)", "scale", key_display="^↑↓", show=False),
        Binding("ctrl+down,alt+down", "scale(-1)", "scale-", show=False),
        Binding("ctrl+f", "search", "search", show=False),
        Binding("ctrl+n", "new_conversation", "new", show=False),
        Binding("ctrl+s", "export", "export", show=False),
        Binding("ctrl+l", "copy_last", "copy", show=False),
    ]

    def __init__(
        self,
        *,
        profile: str | None,
        task: str | None,
        personalized: bool = True,
        compare: bool = False,
        resume: bool = True,
    ) -> None:
        super().__init__()
        self.profile = profile
        self.task_name = task  # a task card name; None: free chat
        self.personalized = personalized
        self.scale = 1.0
        self.compare = compare
        self.resume = resume
        self.conversation_id: int | None = None
        self.system_prompt = ""  # free chat's, of this conversation (kept with it once it exists)
        self.busy = False
        self.adapter_note = ""
        self._app: Any = None  # the app, for worker threads (no active-app context there)
        self._catalogue: Catalogue | None = None

    # --- layout -----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        yield StatusBar(id="status")
        yield VerticalScroll(id="messages")
        yield ChatInput(id="input")
        yield Footer(compact=True)

    @property
    def store(self):
        return self.app.store

    @property
    def card(self):
        return self.app.cards.get(self.task_name) if self.task_name else None

    @property
    def messages(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    async def on_mount(self) -> None:
        self._app = self.app
        self.messages.anchor()  # follow new text until the user scrolls up
        last = self.store.conversations.all(self.profile) if self.profile else []
        if self.resume and last:
            # The task asked for at start (`--task`, else the profile's own) stays: `p2p chat --profile
            # demo` opens on the demo's task even if its last conversation ended in free chat.
            await self.load_conversation(last[0].id, keep_task=True)
        else:
            await self.show_welcome()
        self.refresh_status()
        self.query_one(ChatInput).focus()
        self.prepare_adapter()
        if self.app.first_run:
            self.action_import()

    @property
    def free_chat(self) -> str:
        """How free chat answers now: "summary" (base model + profile summary), "adapter" or "base"."""
        return free_chat_mode(self.app.session, self.profile, self.personalized)

    @property
    def model(self) -> str:
        """The model the next reply comes from, as things are set now (the route's rule: `answering_model`)."""
        free = self.task_name is None
        return answering_model(self.app.session, free, self.free_chat if free and self.personalized else "base")

    def refresh_status(self) -> None:
        free = self.free_chat if self.task_name is None else None
        on_chat = self.model != self.app.session.base_model
        self.query_one(StatusBar).show(
            profile=self.profile, task=self.task_name, personalized=self.personalized, scale=self.scale,
            compare=self.compare, adapter=self.adapter_note, free_chat=free,
            model_kind="chat model" if on_chat else "base model", system_prompt=bool(self.system_prompt and free),
        )
        card = self.card
        what = f"{card.name}: {card.samples[0] if card.samples else card.description}" if card else "say something (free chat)"
        self.query_one(ChatInput).placeholder = f"{INPUT_KEYS} · {what}"
        if card is not None:
            task = card.name
        elif free == "summary":
            task = f"{FREE_CHAT_LABEL} + your profile summary"
        else:
            task = FREE_CHAT_LABEL + (" · free-chat adapter" if free == "adapter" else "")
        if untrained_task(self.app.session, card):  # a user's own card: the adapter never learned it
            task += " · adapter not trained on this task"
        # The model is part of the conversation: named in the header, on each reply and in the export.
        self.app.sub_title = f"{self.profile or 'no profile'} · {task} · {self.model}"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Greyed out in the footer when they cannot apply; hidden (False) where the footer needs the room.
        if action == "stop":
            return self.busy  # not streaming: Esc and Ctrl-C go on to their usual meaning
        if action in ("toggle_personal", "scale", "toggle_compare", "open_profile") and self.profile is None:
            return None
        if action == "scale" and self.task_name is None and self.free_chat != "adapter":
            return None  # free chat without an adapter: there is no strength to set
        return True

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.set_class(busy, "-busy")
        self.refresh_bindings()

    # --- conversations ----------------------------------------------------------------------------
    async def show_welcome(self) -> None:
        await self.messages.remove_children()
        await self.messages.mount(MessageView("system", self.welcome_text(), title="p2p chat"))

    def welcome_text(self) -> str:
        from p2p_local.demo import DEMO_PROFILE, DEMO_QUESTIONS, DEMO_TASK

        lines = []
        session = self.app.session
        if self.profile:
            n = self.store.profiles.get_profile(self.profile).n_items
            lines.append(f"Profile **{self.profile}**: {n} items of history, turned into a LoRA adapter on this device.")
        else:
            lines.append("No profile: answers come from the base model.")
        chat = session.chat_model
        lines.append(f"Task answers come from **{shown(session.base_model)}** (the bundle's base); free chat from "
                     f"**{shown(chat or session.base_model)}**" + (" (an instruct model)" if chat else "")
                     + ". `F2` picks the free-chat model.")
        card = self.card
        if card is not None:
            lines.append(f"Task **{card.name}**: {card.description}")
            if untrained_task(self.app.session, card):
                lines.append(f"Note: {untrained_note(card.name)}.")
        elif self.free_chat == "summary":
            lines.append(f"Free chat: the *{'chat' if chat else 'base'}* model answers, with your profile's summary "
                         "in its prompt (a task adapter would answer everything in its task's format). Tasks "
                         "(`ctrl+t`) show the adapter.")
        elif not chat:
            lines.append("Free chat: the default model is a small *base* model, so tasks (`ctrl+t`) work best.")
        if self.profile == DEMO_PROFILE and self.task_name == DEMO_TASK:  # the demo's questions fit its task only
            lines.append("Try: `" + "`  or  `".join(DEMO_QUESTIONS) + "`, or a bare title such as `Toy Story`.")
        lines.append("`⏎` sends, `ctrl+j` starts a new line, `↑`/`↓` recall earlier prompts; `esc` or `ctrl+c` "
                     "stops an answer.")
        lines.append("`ctrl+b` compares base vs personalized side by side; `ctrl+↑/↓` sets the adapter strength; "
                     "`ctrl+r` switches profile, `ctrl+o` opens it.")
        lines.append("`ctrl+n` new conversation · `ctrl+f` search (`F2` rename, `del` delete) · `ctrl+s` export as "
                     "Markdown · `ctrl+l` copy the last reply (or Tab to a message and press `c`) · `ctrl+p` every "
                     "command: system prompt, rename, delete …")
        return "\n\n".join(lines)

    async def load_conversation(self, conversation_id: int, keep_task: bool = False) -> None:
        """Show a stored conversation (its profile becomes the current one; its last task too, unless
        `keep_task`)."""
        conv = next((c for c in self.store.conversations.all() if c.id == conversation_id), None)
        if conv is None:
            return
        messages = self.store.conversations.messages(conversation_id)
        tasks = [m.meta.get("task") for m in messages if m.role == "user"]
        self.system_prompt = conv.system_prompt
        if conv.scale is not None:  # the strength it was left at
            self.scale = conv.scale
        self.query_one(ChatInput).set_prompts([m.content for m in messages if m.role == "user"])
        # Continue the conversation as it was going: its profile and the task of its last question.
        changed = conv.profile != self.profile or (bool(tasks) and tasks[-1] != self.task_name and not keep_task)
        self.profile = conv.profile
        if tasks and not keep_task:
            self.task_name = tasks[-1]
        if changed:
            self.prepare_adapter()
        self.conversation_id = conversation_id
        await self.messages.remove_children()
        views: list = []
        pair: list[MessageView] = []  # side by side: personalized, then base, answering one question

        def flush_pair() -> None:
            views.extend([ComparePair(base=pair[1], personal=pair[0])] if len(pair) == 2 else pair)
            pair.clear()

        asked = None  # the task of the question being answered
        for m in messages:
            if m.role == "user":
                flush_pair()
                asked = m.meta.get("task")
                views.append(MessageView("user", m.content, title="you" + (f" · {asked}" if asked else "")))
                continue
            card = self.app.cards.get(m.meta.get("task", asked))
            reply = m.role == "assistant"
            title = reply_title(m.meta) if reply else "note · model" if m.meta.get("note") == "model" else ""
            view = MessageView(m.role, m.content, title=title, kind=card.kind if card else None,
                               dist=m.meta.get("dist"), mark=cut_mark(cut_reason(m.meta)) if reply else "")
            if m.role == "assistant" and m.meta.get("compare"):
                if m.meta.get("mode") == "personalized":
                    flush_pair()
                pair.append(view)
                if len(pair) == 2:
                    flush_pair()
            else:
                flush_pair()
                views.append(view)
        flush_pair()
        if views:
            await self.messages.mount_all(views)
        else:
            await self.show_welcome()
        self.messages.scroll_end(animate=False)
        self.refresh_status()

    def free_chat_turns(self) -> list[tuple[str, str]]:
        """Earlier free-chat turns of this conversation as (role, text), for the session's transcript."""
        if self.conversation_id is None:
            return []
        turns: list[tuple[str, str]] = []
        question = None
        for m in self.store.conversations.messages(self.conversation_id):
            if m.role == "user":
                question = None if m.meta.get("task") else m.content
            elif m.role == "assistant" and question is not None and m.content:
                if m.meta.get("compare") and m.meta.get("mode") == "base":
                    continue  # side by side: the chat continues from the personalized reply
                turns += [("user", question), ("assistant", m.content)]
                question = None
        return turns

    # --- sending ----------------------------------------------------------------------------------
    @on(ChatInput.Submitted)
    async def on_submit(self, event: ChatInput.Submitted) -> None:
        event.stop()
        if self.busy:
            self.notify("Still answering: press Esc or Ctrl-C to stop it first.", severity="warning")
            return
        inp = self.query_one(ChatInput)
        inp.clear()
        inp.remember(event.text)
        await self.complete_and_send(event.text)

    # --- a bare movie title -------------------------------------------------------------------------
    def title_matches(self, text: str) -> list[Movie] | None:
        """None: `text` needs no completion; else the movies of the store it may mean (maybe none)."""
        card = self.card
        if not needs_completion(card, text):
            return None
        if self._catalogue is None or self._catalogue.task != card.name:
            self._catalogue = Catalogue(self.store, card)
        return self._catalogue.lookup(text, self.profile)

    async def complete_and_send(self, text: str) -> None:
        """Send `text`, completed to "Title (Year) | Genres: ..." when it is a bare movie title: one match
        at once, several through a picker, none as typed with a notice."""
        matches = self.title_matches(text)
        if matches is None:
            await self.send(text)
        elif len(matches) == 1:
            self.notify(matches[0].text, title="completed from your movies", timeout=4)
            await self.send(matches[0].text)
        elif not matches:
            self.notify(f"“{text}” is not among the movies in your profiles, so its year and genres are unknown: "
                        "sent as typed. Add them yourself: Title (Year) | Genres: A|B", title="no match",
                        severity="warning", timeout=8)
            await self.send(text)
        else:
            options = [(m.text, "from your profiles' movies") for m in matches]
            options.append((AS_TYPED, text))

            async def picked(choice: str | None) -> None:
                if choice is None:  # Esc: back to the input, with the text
                    self.query_one(ChatInput).load_text(text)
                    return
                await self.send(text if choice == AS_TYPED else choice)

            self.app.push_screen(PickerScreen(f"Which “{text}”?", options), picked)

    async def send(self, text: str) -> None:
        """Store the user's message, add the reply view(s) and start streaming."""
        card = self.card
        kind = card.kind if card else None
        transcript = None if card else self.free_chat_turns()
        labelled = card is not None and card.labelled
        if self.conversation_id is None:  # titled by its first question, with the settings made before it
            self.conversation_id = self.store.conversations.new_conversation(self.profile, " ".join(text.split())[:60],
                                                               system_prompt=self.system_prompt, scale=self.scale)
        conv = self.conversation_id
        if len(self.messages.children) == 1 and "system" in self.messages.children[0].classes:
            await self.messages.remove_children()  # the welcome note goes once the chat starts
        if card is None:
            await self.note_model_change()
        self.store.conversations.add_message(conv, "user", text, {"task": self.task_name})
        title = "you" + (f" · {self.task_name}" if self.task_name else "")
        await self.messages.mount(MessageView("user", text, title=title))

        session = self.app.session
        free = free_chat_mode(session, self.profile, True) if card is None else None
        stops = tuple(stop_strings(card)) + (FREE_CHAT_STOPS if card is None else ())

        def job(personalized: bool) -> Job:
            meta = {"mode": "personalized" if personalized else "base", "task": self.task_name,
                    "profile": self.profile, "scale": self.scale if personalized else None}
            if personalized and free is not None:
                meta["free_chat"] = free  # "summary": the base model, the profile summary in the prompt
                if free == "summary":
                    meta["scale"] = None
            # The model expected now; the session says which one answered once it is done (`model_of`).
            meta["model"] = answering_model(session, card is None, (free or "base") if personalized else "base")
            meta["chat_model"] = meta["model"] != session.base_model
            # Titled as the reply will be, less the profile and time until it is done.
            view = MessageView("assistant", title=reply_title({**meta, "profile": None}) + " …", kind=kind)
            return Job(view, conv, text, self.profile, self.task_name or FREE_CHAT, personalized, self.scale,
                       transcript, stops, meta, dist=labelled, system=self.system_prompt if card is None else "",
                       base=session.base_model)

        if self.compare and self.profile is not None:
            jobs = [job(True), job(False)]
            for j in jobs:
                j.meta["compare"] = True
            await self.messages.mount(ComparePair(base=jobs[1].view, personal=jobs[0].view))
        else:
            jobs = [job(self.personalized and self.profile is not None)]
            await self.messages.mount(jobs[0].view)
        self.messages.scroll_end(animate=False)
        self.set_busy(True)
        self.stream_replies(jobs)

    @work(thread=True, exclusive=True, group="reply", exit_on_error=False)
    def stream_replies(self, jobs: list[Job]) -> None:
        worker = get_current_worker()
        try:
            for j in jobs:
                if worker.is_cancelled:
                    self._call(self.finish_job, j, "", True, None, 0.0)
                    continue
                self._stream_one(j, worker)
        finally:
            self._call(self.set_busy, False)

    def _stream_one(self, j: Job, worker: Worker) -> None:
        """Stream one reply (runs in the worker thread, holding the session for its whole length)."""
        app, text, shown, stopped, error, dist = self._app, "", "", False, None, None
        t0 = time.monotonic()
        last = t0 - FLUSH_S  # the first piece shows at once; later ones are batched
        with app.session_lock:
            answer = None
            try:
                # answer() reads the store and returns the `Answer`; iterating it personalizes, attaches
                # and streams (llama.cpp), here in the worker.
                system = {"system": j.system} if j.system else {}  # free chat's system prompt, when set
                answer = app.session_call(app.session.answer, j.text, profile=j.profile, task=j.task,
                                          personalized=j.personalized, scale=j.scale, transcript=j.transcript,
                                          **system)
                for piece in answer:
                    text += piece
                    visible, hit_stop = visible_text(text, j.stops)
                    stopped = worker.is_cancelled
                    if hit_stop or stopped:
                        text = visible
                        break
                    now = time.monotonic()
                    if now - last >= FLUSH_S and len(visible) > len(shown):
                        self._call(j.view.append_text, visible[len(shown):])
                        shown, last = visible, now
                else:
                    text = answer.text  # the stream ended: the answer as the route finished it
                    if cut_mark(answer.finish_reason):
                        j.meta["cut"] = answer.finish_reason  # "length" or "repeat": marked as everywhere
                if isinstance(answer, Answer):  # (a test may stream a bare generator instead)
                    p = answer.personalization
                    if p is not None and p.empty and answer.adapter is None:
                        j.meta["empty"] = True  # no items of the task: no adapter, the base answered
                    j.meta["model"] = app.session_call(app.session.model_of, answer)
                    j.meta["chat_model"] = j.meta["model"] != j.base
            except Exception as e:  # keep the chat alive; show what went wrong in the message
                error = error_text(e)
            finally:
                if answer is not None:
                    answer.close()  # closing the generator stops llama.cpp mid-reply
            if j.dist and text.strip() and not (stopped or error) and answer is not None:
                # The distribution the answer was read off (one evaluation of the prompt, in `answer`).
                got = answer.distribution
                dist = {label: round(float(p), 4) for label, p in got.items()} if got else None
        self._call(self.finish_job, j, text.strip(), stopped, error, time.monotonic() - t0, dist)

    def _call(self, fn, *args, **kwargs) -> None:
        """From a worker thread: run `fn` on the UI thread and wait for it (a no-op once the app is closing)."""
        try:
            self._app.call_from_thread(fn, *args, **kwargs)
        except RuntimeError:
            pass

    async def finish_job(self, j: Job, text: str, stopped: bool, error: str | None, seconds: float,
                         dist: dict[str, float] | None = None) -> None:
        meta = {**j.meta, "seconds": round(seconds, 2)}
        if dist:
            meta["dist"] = dist
        if stopped:
            meta["stopped"], meta["cut"] = True, "stopped"
        if error:
            meta["error"] = error
            self.notify(error, title="answer failed", severity="error", timeout=8)
        if not self.conversation_exists(j.conversation_id):
            return  # the user deleted its conversation while it streamed: nothing of it is kept
        self.store.conversations.add_message(j.conversation_id, "assistant", text, meta)
        if j.view.is_attached:  # not when the user moved to another conversation meanwhile
            body = text if not error else (text + "\n\n" if text else "") + f"**error**: {error}"
            # The partial text stays, marked as everywhere (after the text: copying it copies the answer alone).
            await j.view.finish(body, title=reply_title(meta), stopped=stopped, dist=dist,
                                mark=cut_mark(cut_reason(meta)))
        if meta.get("empty"):
            self.set_adapter_note(f"no {j.task} items: above ×1 the base model answers")

    def action_stop(self) -> None:
        if self.busy:
            self.workers.cancel_group(self, "reply")
            self.notify("stopped", timeout=1.5)

    # --- personalization --------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="adapter", exit_on_error=False)
    def prepare_adapter(self) -> None:
        """Make (or fetch from the cache) the adapter for the current profile and task, off the UI thread."""
        profile, task = self.profile, self.task_name
        if profile is None or not self.personalized and not self.compare:
            self._call(self.set_adapter_note, "")
            return
        if task is None:  # free chat: an adapter only from a bundle trained for it
            if free_chat_mode(self._app.session, profile, True) != "adapter":
                self._call(self.set_adapter_note, "no adapter in free chat")
                return
            task = FREE_CHAT
        self._call(self.set_adapter_note, "making adapter …")
        worker = get_current_worker()
        try:
            with self._app.session_lock:
                if worker.is_cancelled:  # a newer request (another profile or task) replaced this one
                    return
                result = self._app.session_call(self._app.session.personalize, profile, task)
        except Exception as e:
            self._call(self.set_adapter_note, "no adapter")
            self._call(self.notify, error_text(e), title="personalization failed", severity="error", timeout=10)
            return
        if (profile, task) == (self.profile, self.task_name or FREE_CHAT):
            self._call(self.set_adapter_note, adapter_note(result))

    def set_adapter_note(self, note: str) -> None:
        self.adapter_note = note
        self.refresh_status()

    def action_toggle_personal(self) -> None:
        self.personalized = not self.personalized
        self.notify("personalized answers" if self.personalized else "base model answers", timeout=2)
        self.refresh_status()
        if self.personalized:
            self.prepare_adapter()

    def action_scale(self, direction: int) -> None:
        if self.check_action("scale", ()) is None:
            return
        # Floor at one step: x0 would be the base model labelled "personalized" (ctrl+g is the base model).
        self.scale = min(SCALE_MAX, max(SCALE_STEP, round(self.scale + direction * SCALE_STEP, 2)))
        if self.conversation_id is not None:  # the conversation keeps its strength (reopened, it is set again)
            self.store.conversations.set_conversation_settings(self.conversation_id, scale=self.scale)
        self.refresh_status()

    def action_toggle_compare(self) -> None:
        self.compare = not self.compare
        self.refresh_status()
        if self.compare:
            self.prepare_adapter()

    def action_pick_task(self) -> None:
        options = [(FREE_CHAT_LABEL, "plain transcript, no task template")]
        options += [(name, card.description) for name, card in sorted(self.app.cards.items())]

        def picked(choice: str | None) -> None:
            if choice is None:
                return
            card = resolve_task(choice, self.app.cards.__getitem__)
            self.task_name = card.name if card is not None else None
            self.refresh_status()
            self.prepare_adapter()

        self.app.push_screen(PickerScreen("Task", options, current=self.task_name or FREE_CHAT_LABEL), picked)

    def action_pick_profile(self) -> None:
        options = [(p.name, f"{p.n_items} items · {p.task or 'no default task'}") for p in self.store.profiles.list_profiles()]
        options.append(("(none)", "base model only, no profile"))

        async def picked(choice: str | None) -> None:
            if choice is None or choice == (self.profile or "(none)"):
                return
            await self.switch_profile(None if choice == "(none)" else choice)

        self.app.push_screen(PickerScreen("Profile", options, current=self.profile or "(none)"), picked)

    async def switch_profile(self, name: str | None) -> None:
        self.profile = name
        default_task = self.store.profiles.get_profile(name).task if name is not None else None
        if default_task in self.app.cards:
            self.task_name = default_task
        self.start_conversation()
        last = self.store.conversations.all(name) if name else []
        if last:
            await self.load_conversation(last[0].id)
        else:
            await self.show_welcome()
        self.refresh_status()
        self.prepare_adapter()

    def action_open_profile(self) -> None:
        if self.profile is None:
            return

        async def closed(changed: bool | str | None) -> None:
            if changed == FORGOTTEN:  # the profile is gone, with its conversations
                own = own_profiles(self.store)
                await self.switch_profile(own[0] if own else None)
                if not own:
                    self.action_import()
            elif changed:
                self.prepare_adapter()  # the history changed: a new adapter

        self.app.push_screen(ProfileScreen(self.profile, self.task_name), closed)

    def action_import(self) -> None:
        """The first-run screen: import from git or a file, or use the demo; the chat opens the result."""

        first = self.app.first_run

        async def done(profile: str | None) -> None:
            if first:  # answered once (any way): a demo-only store now opens on the chat
                mark_first_run_done(self.store)
                self.app.first_run = False
            if profile is not None and profile != self.profile:
                await self.switch_profile(profile)
            elif profile is not None:
                self.prepare_adapter()  # imported into the current profile: a new adapter
            self.query_one(ChatInput).focus()

        self.app.push_screen(FirstRunScreen(first=first), done)

    # --- conversations: new, search, rename, delete, system prompt, export, copy -------------------
    def start_conversation(self) -> None:
        """No conversation yet (the next message starts one): its own settings start empty."""
        self.conversation_id = None
        self.system_prompt = ""
        self.query_one(ChatInput).set_prompts([])
        self.refresh_status()

    async def action_new_conversation(self) -> None:
        self.action_stop()
        self.start_conversation()
        await self.show_welcome()

    def action_search(self) -> None:
        async def picked(conversation_id: int | None) -> None:
            if conversation_id is not None:
                await self.load_conversation(conversation_id)
            elif self.conversation_id is not None and not self.conversation_exists(self.conversation_id):
                await self.conversation_deleted(self.conversation_id)  # deleted in the list
            self.refresh_status()

        self.app.push_screen(HistoryScreen(), picked)

    def conversation_exists(self, conversation_id: int) -> bool:
        try:
            self.store.conversations.get_conversation(conversation_id)
        except StoreError:
            return False
        return True

    async def conversation_deleted(self, conversation_id: int) -> None:
        if conversation_id == self.conversation_id:
            self.action_stop()
            self.start_conversation()
            await self.show_welcome()

    def action_rename(self) -> None:
        if self.conversation_id is None:
            self.notify("Nothing to rename yet: the first message starts the conversation.", severity="warning")
            return
        ask_rename(self.app, self.conversation_id)

    def action_delete_conversation(self) -> None:
        if self.conversation_id is None:
            self.notify("No conversation to delete yet.", severity="warning")
            return

        async def deleted(conversation_id: int | None) -> None:
            if conversation_id is not None:
                await self.conversation_deleted(conversation_id)

        ask_delete(self.app, self.conversation_id, deleted)

    def action_system_prompt(self) -> None:
        """Free chat's system prompt for this conversation (the next one starts without)."""

        def answered(text: str | None) -> None:
            if text is None:
                return
            self.system_prompt = text
            if self.conversation_id is not None:
                self.store.conversations.set_conversation_settings(self.conversation_id, system_prompt=text)
            self.notify(f"system prompt: {shown(text)}" if text else "no system prompt", timeout=3)
            self.refresh_status()

        self.app.push_screen(AskScreen(
            "System prompt", "For free chat in this conversation: said to the model before the conversation "
            "(after what is known of you). Task answers keep their task's prompt. Empty: none.",
            value=self.system_prompt, placeholder="e.g. Answer in French, in one sentence."), answered)

    # --- the model ----------------------------------------------------------------------------------
    def action_pick_model(self) -> None:
        """The registered models (`p2p models list`): free chat runs on the one picked; tasks on the base."""
        session = self.app.session
        base = session.base_model
        try:
            models = session.chat_models()
        except Exception as e:  # a damaged registry: say so, keep the chat
            self.notify(error_text(e), title="no model list", severity="error", timeout=8)
            return
        options = [(base, "the bundle's base: every task answer; free chat as a plain transcript")]
        options += [(name, shown(about) or "registered with p2p models add") for name, about in models.items()
                    if name != base]

        def picked(choice: str | None) -> None:
            if choice is not None and choice != (session.chat_model or base):
                self.switch_model(None if choice == base else choice)

        self.app.push_screen(PickerScreen("Model for free chat", options, current=session.chat_model or base),
                             picked)

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def switch_model(self, name: str | None) -> None:
        """Prepare and load the model (seconds) off the UI thread; never while an answer runs."""
        app = self._app
        self._call(self.notify, f"loading {name or app.session.base_model} …", timeout=3)
        try:
            with app.session_lock:
                app.session_call(app.session.use_chat_model, name)
        except Exception as e:
            self._call(self.notify, error_text(e), title="model not changed", severity="error", timeout=10)
            return
        self._call(self.model_switched)

    async def model_switched(self) -> None:
        self.notify(f"free chat now runs on {self.app.session.chat_model or self.app.session.base_model}", timeout=3)
        if self.task_name is None:
            await self.note_model_change()
        self.refresh_status()

    def last_free_chat_model(self) -> str | None:
        """The model that answered this conversation's free chat last (a reply, or a model note), if known."""
        for m in reversed(self.store.conversations.messages(self.conversation_id) if self.conversation_id is not None else []):
            if m.role == "system" and m.meta.get("note") == "model":
                return m.meta.get("model")
            if m.role == "assistant" and m.meta.get("task") is None and m.meta.get("model"):
                if not (m.meta.get("compare") and m.meta.get("mode") == "base"):
                    return m.meta["model"]
        return None

    async def note_model_change(self) -> None:
        """A note in the conversation where free chat's model changes (stored with the messages, so a resumed
        conversation shows which model answered what; each reply's title names it too)."""
        now, before = self.model, self.last_free_chat_model()
        if self.conversation_id is None or before is None or before == now:
            return
        text = f"Free chat now answered by **{shown(now)}** (before: {shown(before)})."
        self.store.conversations.add_message(self.conversation_id, "system", text, {"note": "model", "model": now, "previous": before})
        if len(self.messages.children) == 1 and "system" in self.messages.children[0].classes:
            await self.messages.remove_children()  # the welcome note
        await self.messages.mount(MessageView("system", text, title="note · model"))
        self.messages.scroll_end(animate=False)

    def action_export(self) -> None:
        if self.conversation_id is None:
            self.notify("Nothing to export yet.", severity="warning")
            return
        path = export_conversation(self.store, self.conversation_id)
        self.notify(str(path), title="conversation exported", timeout=6)

    def action_copy_last(self) -> None:
        replies = [v for v in self.query(MessageView) if v.role == "assistant" and v.text]
        if not replies:
            self.notify("No reply to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(replies[-1].text)
        self.notify("last reply copied to the clipboard", timeout=2)


def adapter_note(result: AdapterResult) -> str:
    """'adapter made in 264 ms' / 'adapter cached' (+ caveats) for the status line."""
    timings = result.timings_ms or {}
    total = timings.get("total_ms", sum(timings.values()))
    note = "adapter cached" if result.cached else f"adapter made in {total:.0f} ms"
    if result.empty:  # the population adapter; above x1 the route answers from the base (it turned to noise)
        note += " · no items of this task: above ×1 the base model answers"
    if result.neutral:
        note += " · untrained bundle: no effect"
    return note
