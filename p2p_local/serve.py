"""`p2p serve`: an OpenAI-compatible HTTP server over the app's one answering route.

Every request is answered as `p2p ask` answers it: `Session.choose` picks the profile and task, the query
is read by `Request` (a diff for commit subjects too), a bare movie title is completed as `ask` completes
it, and `Session.answer` gives the `Answer` that is streamed. The model name chooses what answers:
`p2p/<profile>/<task>`, `p2p/<profile>` (its own task), `p2p/base` (the base model, free chat),
`p2p/base/<task>` (the base model with the task's prompt), or plain `p2p` with the body fields `profile` /
`task` (then `choose`'s rule, as `p2p ask` without --profile). Extra body field `strength` (0-2) is
`ask --scale`; each response carries a `p2p` object saying what answered (profile, task, adapter, scale,
finish, read, candidates).

One engine answers one request at a time: requests wait in order in a bounded queue (more waiting than
`queue`: 429 with Retry-After) and run on one worker thread, which keeps the route's lock on the thread that
took it. A client that goes away stops its generation (`Answer.close`) or leaves the queue.

Safe by default: loopback only unless the caller allows more; the Host header must name this server (DNS
rebinding); a request with an Origin header is refused unless the origin was allowed (and only then are
CORS headers sent); POST bodies must be `application/json` (a web page cannot send that cross-site without
a CORS preflight) and at most MAX_BODY bytes; every error is `{"error": {message, type, param, code}}`.

The store stays writable: the adapter cache (`Session`: files under the data dir, one row per adapter in
the store's `adapters` table) records every adapter it makes, so a request may add a cache row. The user's
own data (profiles, items, conversations, task cards) is only read.

Ignored request fields (the route has no such knob): top_p, presence/frequency penalties, logit_bias, user.
Refused (400): n > 1, best_of > 1, echo, logprobs, suffix, stop, tools, response_format other than text.
`usage` counts the prompt's and the answer text's tokens with the engine's tokenizer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from p2p_local.commands.args import MAX_SCALE, MAX_TEMPERATURE, MAX_TOKENS
from p2p_local.data.format import FREE_CHAT, resolve_task
from p2p_local.errors import P2PError, StoreError, UsageError

log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: one format on the server's stderr

DEFAULT_PORT = 8765
DEFAULT_QUEUE = 8
MAX_BODY = 1 << 20  # bytes of a request body (a large staged diff fits; more is refused with 413)
BODY_TIMEOUT = 30.0  # seconds to receive a body: a client trickling one in holds no slot for ever
HEAD_TIMEOUT = 10.0  # seconds for a request's head to arrive (uvicorn has no such limit: slowloris)
GRACEFUL_SHUTDOWN = 5  # seconds in-flight answers get on SIGINT/SIGTERM before they are cancelled
MAX_SEED = 2**32 - 1  # llama.cpp's seed is a uint32
CLOSE = {"Connection": "close"}  # a body left unread: the connection cannot carry another request
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "ip6-localhost", "ip6-loopback")


# --- errors in the OpenAI wire format ----------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error with the OpenAI body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def p2p_message(e: P2PError) -> str:
    """A P2PError as one line: its message, then its hint (which names the CLI's commands)."""
    msg = str(e.args[0]) if e.args else type(e).__name__
    return f"{msg} (hint: {e.hint})" if e.hint else msg


def from_p2p(e: P2PError, param: str | None = None) -> ApiError:
    """What the route raised, as an HTTP error: the user's mistakes 400, what the machine lacks 500."""
    if isinstance(e, UsageError | StoreError):
        return ApiError(400, p2p_message(e), code=type(e).__name__.removesuffix("Error").lower() + "_error",
                        param=param)
    return ApiError(500, p2p_message(e), code=type(e).__name__, type="server_error")


# --- what a request asks for -------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Who answers: a stored profile (None: the base model) and the task, as `Session.choose` reads them."""

    profile: str | None
    task: str
    personalized: bool = True

    @property
    def model(self) -> str:
        if self.profile is None:
            return "p2p/base" if self.task == FREE_CHAT else f"p2p/base/{self.task}"
        return f"p2p/{self.profile}/{self.task}"


@dataclass
class Call:
    """One answer to make: `Session.answer`'s arguments (and the seed, which only the route takes)."""

    text: str
    target: Target
    strength: float = 1.0
    temperature: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    transcript: list[tuple[str, str]] | None = None


def resolve_target(session: Any, model: str | None, profile: str | None, task: str | None) -> Target:
    """The model name and the `profile` / `task` fields -> the profile and task that answer (store reads:
    run it off the event loop). Unknown profile or task: 404; a contradiction or ambiguity: 400."""
    base, named_profile, named_task = False, None, None
    if model is not None and model != "p2p":
        if not model.startswith("p2p/") or model == "p2p/":
            raise ApiError(404, f"the model {model[:80]!r} does not exist: this server answers p2p/<profile>/<task>, "
                                "p2p/<profile> and p2p/base (GET /v1/models lists them)",
                           code="model_not_found", param="model")
        head, _, rest = model[4:].partition("/")
        if head == "base":
            base, named_task = True, rest or None
        else:
            named_profile, named_task = head, rest or None
    for name, named, given in (("profile", named_profile, profile), ("task", named_task, task)):
        if named is not None and given is not None and named != given:
            raise ApiError(400, f"the model names {name} {named!r}, the {name} field {given!r}", param=name)
    if base and profile is not None:
        raise ApiError(400, "p2p/base answers without a profile; for a profile's task without its adapter "
                            "ask its model with strength 0", param="profile")
    profile, task = named_profile or profile, named_task or task
    if task is not None:
        try:
            card = resolve_task(task, session.card)
        except P2PError as e:
            raise ApiError(404, p2p_message(e), code="task_not_found",
                           param="model" if named_task else "task") from None
        task = FREE_CHAT if card is None else card.name
    if profile is not None and not session.store.profiles.profile_exists(profile):
        known = [p.name for p in session.store.profiles.list_profiles()]
        raise ApiError(404, f"no profile named {profile[:70]!r} (known: {', '.join(known[:10]) or 'none'})",
                       code="profile_not_found", param="model" if named_profile else "profile")
    if base:
        return Target(None, task or FREE_CHAT, personalized=False)
    try:
        chosen, task = session.choose(profile, task)
    except UsageError as e:
        raise ApiError(400, f"{e.args[0]}: name one in the model, p2p/PROFILE/TASK (GET /v1/models lists them)",
                       param="model") from None
    except P2PError as e:
        raise from_p2p(e, "model") from None
    return Target(chosen, task)


def list_models(session: Any) -> list[dict[str, Any]]:
    """`p2p/base`, then each stored profile's model for each known task it holds items of."""
    store = session.store
    known = set(store.task_cards.task_names())
    out = [{"id": "p2p/base", "object": "model", "created": 0, "owned_by": "p2p-local",
            "p2p": {"profile": None, "task": FREE_CHAT, "items": 0}}]
    for p in store.profiles.list_profiles():
        for task, n in store.profiles.task_counts(p.name).items():
            if task in known:
                out.append({"id": f"p2p/{p.name}/{task}", "object": "model", "created": int(p.created),
                            "owned_by": "p2p-local", "p2p": {"profile": p.name, "task": task, "items": n}})
    return out


# --- reading a request body -----------------------------------------------------------------------------
async def read_json(request: HttpRequest) -> dict[str, Any]:
    """The body as a JSON object: application/json, at most MAX_BODY bytes, received within BODY_TIMEOUT."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Also what keeps a web page's "simple" cross-site POST (text/plain, forms) from reaching the model.
        raise ApiError(415, "the body must be JSON sent with Content-Type: application/json",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise ApiError(400, "invalid Content-Length", code="invalid_request")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the body is {int(length):,} bytes; at most {MAX_BODY:,} are read",
                           code="request_too_large", headers=CLOSE)
    body = bytearray()
    try:
        with anyio.fail_after(BODY_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    raise ApiError(413, f"the body is more than {MAX_BODY:,} bytes", code="request_too_large",
                                   headers=CLOSE)
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {BODY_TIMEOUT:g} s", code="request_timeout",
                       headers=CLOSE) from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, a huge number, absurd nesting
        raise ApiError(400, f"the body is not valid JSON ({str(e)[:100]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _text(value: Any, param: str) -> str:
    """A string the model can read: valid UTF-8 (no lone surrogates from \\ud800 escapes), no NUL."""
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string", param=param, code="invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid UTF-8 text (a lone surrogate escape)", param=param,
                       code="invalid_value") from None
    if "\x00" in value:
        raise ApiError(400, f"{param} holds a NUL character", param=param, code="invalid_value")
    return value


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    return None if value is None else _text(value, key)


def _number(body: dict[str, Any], key: str, top: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{key} must be a number", param=key, code="invalid_type")
    if not math.isfinite(value) or not 0 <= value <= top:
        raise ApiError(400, f"{key} must be between 0 and {top:g}", param=key, code="invalid_value")
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, top: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", param=key, code="invalid_type")
    if not low <= value <= top:
        raise ApiError(400, f"{key} must be between {low} and {top}", param=key, code="invalid_value")
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields asking for what the route cannot give are refused, not silently ignored."""
    n = _integer(body, "n", 1, 2**31)
    if n not in (None, 1):
        raise ApiError(400, "n must be 1: the engine answers one choice", param="n", code="unsupported_value")
    best_of = _integer(body, "best_of", 1, 2**31)
    if best_of not in (None, 1):
        raise ApiError(400, "best_of must be 1", param="best_of", code="unsupported_value")
    for key in ("echo", "logprobs", "top_logprobs", "suffix", "stop", "tools", "functions"):
        if body.get(key) not in (None, False, "", [], 0):
            raise ApiError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported_parameter")


@dataclass
class Options:
    """The body's fields common to both endpoints, checked."""

    model: str | None
    profile: str | None
    task: str | None
    strength: float
    temperature: float
    max_tokens: int | None
    seed: int | None
    stream: bool
    include_usage: bool


def read_options(body: dict[str, Any], chat: bool) -> Options:
    _refuse_unsupported(body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream", code="invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options", code="invalid_type")
    include_usage = bool(opts and opts.get("include_usage"))
    max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS)
    if chat and max_tokens is None:  # the chat endpoint's newer name for it
        max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS)
    return Options(
        model=_optional_text(body, "model"), profile=_optional_text(body, "profile"),
        task=_optional_text(body, "task"), strength=_number(body, "strength", MAX_SCALE, 1.0),
        # 0 (greedy) by default, as `p2p ask`: the same question gets the same answer
        temperature=_number(body, "temperature", MAX_TEMPERATURE, 0.0), max_tokens=max_tokens,
        seed=_integer(body, "seed", 0, MAX_SEED), stream=bool(stream), include_usage=include_usage)


def prompt_text(body: dict[str, Any]) -> str:
    """A completion's prompt: one string (or a list of exactly one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise ApiError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (token lists and several prompts are not supported)",
                       param="prompt", code="invalid_type")
    return _text(prompt, "prompt")


def chat_turns(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The messages as (role, text); the last one must be the user's. System messages are dropped: the
    route frames the prompt itself (the task's card, or what the profile says of the user)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages", code="invalid_type")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", param=where, code="invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool", param=f"{where}.role",
                           code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise ApiError(400, f"{where}.content: only text parts are supported", param=f"{where}.content",
                                   code="unsupported_value")
                parts.append(_text(part.get("text"), f"{where}.content"))
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        else:
            content = _text(content, f"{where}.content")
        if role in ("user", "assistant"):
            turns.append((role, content))
    if not turns or turns[-1][0] != "user" or messages[-1].get("role") != "user":
        raise ApiError(400, "the last message must be the user's: it is the query", param="messages",
                       code="invalid_value")
    return turns


# --- the engine's one worker --------------------------------------------------------------------------
@dataclass
class Job:
    """A call waiting for or on the engine. The worker thread `emit`s ("piece", text), then ("done",
    result) or ("error", exception); the request's task reads them from `events` on the event loop."""

    call: Call
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is listening
            self.cancelled.set()


class _Trim:
    """The streamed pieces, trimmed as `finish_text` trims the answer: no leading whitespace, and trailing
    whitespace held back until more text follows, so the chunks add up to `Answer.text`."""

    def __init__(self) -> None:
        self.started, self.pending = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = self.pending + piece
        kept = body.rstrip()
        self.pending = body[len(kept):]
        return kept


class EngineQueue:
    """The bounded queue in front of the one engine, and the thread that answers from it, in order."""

    def __init__(self, session: Any, queue: int = DEFAULT_QUEUE) -> None:
        self.session, self.limit = session, queue
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.seconds = 2.0  # running mean of an answer's time, for Retry-After

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="p2p-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse what waits, cancel what runs, and wait for the worker to let go of the engine."""
        with self._cv:
            self._stopping = True
            for job in self._jobs:
                job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
            self._jobs.clear()
            if self._current is not None:
                self._current.cancelled.set()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise 429 (more than `limit` waiting) / 503 (shutting down)."""
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._jobs) >= self.limit:
                wait = max(1, math.ceil(self.seconds * (len(self._jobs) + 1)))
                raise ApiError(429, f"{len(self._jobs)} requests are already waiting for the model; retry later",
                               type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(wait)})
            self._jobs.append(job)
            self._cv.notify()

    def withdraw(self, job: Job) -> None:
        """The client left: drop the job if it still waits, else stop its generation."""
        job.cancelled.set()
        with self._cv, contextlib.suppress(ValueError):
            self._jobs.remove(job)

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
                job = self._current = self._jobs.popleft()
            t0 = time.perf_counter()
            try:
                if not job.cancelled.is_set():
                    self._answer(job)
            finally:
                with self._cv:
                    self._current = None
                self.seconds = 0.8 * self.seconds + 0.2 * (time.perf_counter() - t0)
        close_thread_store(self.session)

    def _answer(self, job: Job) -> None:
        """`p2p ask`'s steps for one call, on this thread (the route's lock is taken and let go here)."""
        from p2p_local.commands.ask import QueryTooLong, asked_text

        s, c = self.session, job.call
        try:
            try:
                text = asked_text(s, c.text, c.target.task, c.target.profile, quiet=True)
            except QueryTooLong as e:
                raise ApiError(400, p2p_message(e), code="context_length_exceeded") from None
            answer = self._open(text, c)
            trim = _Trim()
            with answer:  # leaving it early closes the stream: the generation stops
                for piece in answer:
                    if job.cancelled.is_set():
                        return
                    out = trim.feed(piece)
                    if out:
                        job.emit("piece", out)
            if job.cancelled.is_set():
                return
            job.emit("done", self._result(answer, c.target))
        except ApiError as e:
            job.emit("error", e)
        except P2PError as e:
            if "does not fit the context" in str(e):  # the asker's text is too long, not the server's fault
                job.emit("error", ApiError(400, p2p_message(e), code="context_length_exceeded"))
            else:
                job.emit("error", from_p2p(e))
        except Exception as e:  # a bug: the client gets one line, the server's log the traceback
            log.exception("p2p serve: answering failed")
            job.emit("error", ApiError(500, f"internal error ({type(e).__name__})", code="internal_error"))

    def _open(self, text: str, c: Call) -> Any:
        t = c.target
        return self.session.answer(text, profile=t.profile, task=t.task, personalized=t.personalized,
                                   scale=c.strength, temperature=c.temperature, max_tokens=c.max_tokens,
                                   transcript=c.transcript, seed=c.seed)

    def _result(self, answer: Any, target: Target) -> dict[str, Any]:
        engine = self.session.engine
        p2p: dict[str, Any] = {
            "profile": target.profile, "task": answer.request.task,
            "adapter": str(answer.adapter) if answer.adapter else None, "scale": answer.scale,
            "finish": answer.finish_reason, "read": answer.request.read, "query": answer.request.query}
        if answer.candidates:
            p2p["candidates"] = [{"text": x.text, "logprob": round(x.logprob, 4), "copy": x.copy}
                                 for x in answer.candidates]
        if answer.distribution is not None:
            p2p["distribution"] = {k: round(v, 6) for k, v in answer.distribution.items()}
        prompt = len(engine.tokenize(answer.prompt)) if answer.prompt else 0
        completion = len(engine.tokenize(answer.text, add_bos=False)) if answer.text else 0
        return {"text": answer.text, "finish_reason": "length" if answer.finish_reason == "length" else "stop",
                "p2p": p2p, "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                      "total_tokens": prompt + completion}}


def close_thread_store(session: Any) -> None:
    """Close this thread's store connection (`Session.store` keeps one per thread; only its own thread can
    close it, which also checkpoints the write-ahead log)."""
    with contextlib.suppress(Exception):
        session.store.close()


# --- the endpoints ----------------------------------------------------------------------------------------
async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body is already read, so only a disconnect can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, receive: Receive | None) -> tuple[str, Any]:
    """The job's next event; None when the client left first (`receive` watched while waiting)."""
    if receive is None:
        return await job.events.get()
    get = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not get.done():
            get.cancel()
    if not get.done() or get.cancelled():
        return ("gone", None)
    return get.result()


class App:
    """The ASGI application: routes, the engine queue, and the checks in front of them."""

    def __init__(self, session: Any, *, queue: int = DEFAULT_QUEUE, allowed_hosts: Iterable[str] = LOOPBACK_NAMES,
                 cors_origins: Iterable[str] = (), close_session: bool = False) -> None:
        self.session, self.close_session = session, close_session
        self.engine = EngineQueue(session, queue)
        # Store reads (model names, the model list) on one long-lived thread: `Session.store` opens a
        # connection per thread, and the event loop's thread pool retires idle threads and starts new ones.
        self.reads = ThreadPoolExecutor(1, thread_name_prefix="p2p-serve-store")
        self.cors_origins = list(cors_origins)
        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        middleware = []
        if self.cors_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=self.cors_origins,
                                         allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"]))
        app = Starlette(routes=routes, middleware=middleware, lifespan=self.lifespan,
                        exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                            Exception: _internal_error})
        self.asgi: ASGIApp = GuardMiddleware(app, allowed_hosts, self.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self.engine.stop)
            await self.read(close_thread_store, self.session)
            self.reads.shutdown()
            if self.close_session:  # here, not after uvicorn returns: on SIGTERM it re-raises the signal
                self.session.close()
                log.info("p2p serve: the model and the store are closed")

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.reads, fn, *args)

    async def models(self, request: HttpRequest) -> Response:
        data = await self.read(list_models, self.session)
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: HttpRequest) -> Response:
        wanted = request.path_params["model"]
        for m in await self.read(list_models, self.session):
            if m["id"] == wanted:
                return JSONResponse(m)
        raise ApiError(404, f"the model {wanted[:80]!r} does not exist (GET /v1/models lists them)",
                       code="model_not_found", param="model")

    async def completions(self, request: HttpRequest) -> Response:
        body = await read_json(request)
        opts = read_options(body, chat=False)
        text = prompt_text(body)
        return await self._answer(request, opts, text, None, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        body = await read_json(request)
        opts = read_options(body, chat=True)
        turns = chat_turns(body)
        return await self._answer(request, opts, turns[-1][1], turns[:-1], chat=True)

    async def _answer(self, request: HttpRequest, opts: Options, text: str,
                      earlier: list[tuple[str, str]] | None, chat: bool) -> Response:
        if not text.strip():
            raise ApiError(400, "the query is empty", param="messages" if chat else "prompt", code="invalid_value")
        target = await self.read(resolve_target, self.session, opts.model, opts.profile, opts.task)
        # Free chat reads the conversation; a task answers the last user message alone, as `p2p ask` does.
        transcript = earlier if target.task == FREE_CHAT and earlier else None
        call = Call(text, target, opts.strength, opts.temperature, opts.max_tokens, opts.seed, transcript)
        job = Job(call, asyncio.get_running_loop())
        self.engine.submit(job)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": target.model}
        try:
            first = await _next_event(job, request.receive)  # an error before any text keeps its own status
        except BaseException:
            self.engine.withdraw(job)
            raise
        if first[0] == "gone":
            self.engine.withdraw(job)
            return Response(status_code=499)  # nobody reads it
        if first[0] == "error":
            raise first[1]
        if opts.stream:
            return StreamingResponse(self._sse(job, first, meta, chat, opts.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, event = [], first
        try:
            while event[0] == "piece":
                pieces.append(event[1])
                event = await _next_event(job, request.receive)
        finally:
            if event[0] not in ("done", "error"):  # gone or cancelled: stop the generation
                self.engine.withdraw(job)
        if event[0] == "gone":
            return Response(status_code=499)
        if event[0] == "error":
            raise event[1]
        result = event[1]
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": result["finish_reason"]}
        if chat:
            choice["message"] = {"role": "assistant", "content": result["text"]}
            obj = "chat.completion"
        else:
            choice["text"] = result["text"]
            obj = "text_completion"
        return JSONResponse({**meta, "object": obj, "choices": [choice], "usage": result["usage"],
                             "p2p": result["p2p"]})

    async def _sse(self, job: Job, event: tuple[str, Any], meta: dict[str, Any], chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece, the last with finish_reason and the `p2p` object. Starlette
        cancels this generator when the client goes away: `finally` then stops the generation."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, **extra: Any) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if extra.pop("role", False):
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({**meta, "object": obj, "choices": [choice], **extra}) + "\n\n"

        done = False
        try:
            if chat:
                yield chunk(None, role=True)
            while event[0] == "piece":
                yield chunk(event[1])
                event = await job.events.get()
            if event[0] == "error":
                err: ApiError = event[1]
                yield "data: " + json.dumps(error_body(err.message, err.type, err.param, err.code)) + "\n\n"
            else:
                result = event[1]
                yield chunk(None, result["finish_reason"], p2p=result["p2p"])
                if include_usage:
                    yield "data: " + json.dumps({**meta, "object": obj, "choices": [],
                                                 "usage": result["usage"]}) + "\n\n"
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.engine.withdraw(job)


async def _api_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"no route {request.method} {request.url.path[:100]}" if exc.status_code in (404, 405) else exc.detail
    return JSONResponse(error_body(message, "invalid_request_error", None, code), exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
    return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error", None,
                                   "internal_error"), 500)


class GuardMiddleware:
    """Before anything else: the Host header must name this server (a DNS-rebinding page names its own
    domain), and a browser's Origin must be one allowed with --cors-origin."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = {h.lower().strip("[]").rstrip(".") for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k: v for k, v in scope["headers"] if k in (b"host", b"origin")}
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                await _send_error(send, 400, "the Host header does not name this server", "invalid_host")
                return
            origin = headers.get(b"origin")
            if origin is not None and origin.decode("latin-1").rstrip("/").lower() not in self.origins:
                await _send_error(send, 403, "requests from web pages are refused unless their origin is "
                                             "allowed (p2p serve --cors-origin ORIGIN)", "origin_not_allowed")
                return
        await self.app(scope, receive, send)


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    await JSONResponse(error_body(message, "invalid_request_error", None, code), status)(
        {"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def host_name(header: str) -> str:
    """The host of a Host header, without its port: `[::1]:8765` -> `::1`, `Localhost.:80` -> `localhost`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


# --- running it -------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) reaches this machine only."""
    host = host.strip("[]")
    if host.lower().rstrip(".") in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def allowed_hosts(host: str) -> list[str]:
    """What the Host header may name: loopback names, the bound host, and (bound beyond loopback) this
    machine's names and, for a wildcard address, every address of its interfaces."""
    names = {*LOOPBACK_NAMES, host.strip("[]").lower()}
    if not is_loopback(host):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        if host.strip("[]") in ("0.0.0.0", "::", ""):
            import psutil

            for addrs in psutil.net_if_addrs().values():
                names |= {a.address.split("%")[0].lower() for a in addrs
                          if a.family in (socket.AF_INET, socket.AF_INET6)}
    return sorted(names)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a P2PError saying why not."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except OSError as e:
        raise UsageError(f"cannot resolve --host {host!r}: {e.strerror or e}",
                         hint="give an address such as 127.0.0.1") from None
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = ("another program listens there: pick another port with --port N" if e.errno == 98 else
                "ports below 1024 need privileges: pick --port 1024 or above" if e.errno == 13 else
                "the address must belong to this machine" if e.errno == 99 else None)
        raise P2PError(f"cannot listen on {host}:{port}: {e.strerror or e}", hint=hint) from None
    return sock


def head_timeout_protocol(head_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's head: a client that opens a connection (or
    keeps one alive) and trickles its headers in is cut off after `head_timeout` seconds."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timeout, self.cycle)

        def _head_timeout(self, cycle: Any) -> None:
            # Still the cycle of then, and it is over (or there was none): no new request head came.
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def server_config(app: App, *, log_level: str = "info", access_log: bool = True,
                  head_timeout: float = HEAD_TIMEOUT, limit_concurrency: int | None = None) -> Any:
    """uvicorn's config for `app`: h11, no websockets, no proxy headers, bounded connections."""
    import uvicorn

    return uvicorn.Config(
        app, http=head_timeout_protocol(head_timeout), ws="none", lifespan="on", log_level=log_level,
        access_log=access_log, proxy_headers=False, server_header=False, timeout_keep_alive=5,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN, h11_max_incomplete_event_size=64 * 1024,
        # Connections beyond this get a 503 at once: slow clients cannot exhaust file descriptors.
        limit_concurrency=limit_concurrency or max(64, 4 * app.engine.limit))


def serve(*, host: str = "127.0.0.1", port: int = DEFAULT_PORT, cors_origins: Iterable[str] = (),
          queue: int = DEFAULT_QUEUE, open_session: Callable[[], Any] | None = None,
          say: Callable[[str], None] = print) -> None:
    """Bind, load the model once, and serve until SIGINT/SIGTERM (the session is closed on the way out).
    The caller has checked that a non-loopback host is allowed."""
    import uvicorn

    sock = bind(host, port)
    try:
        if open_session is None:
            from p2p_local.personalize import Session

            open_session = Session.open
        session = open_session()
    except BaseException:
        sock.close()
        raise
    app = App(session, queue=queue, allowed_hosts=allowed_hosts(host), cors_origins=cors_origins,
              close_session=True)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    say(f"p2p serve: listening on http://{shown}:{bound[1]}/v1 (OpenAI API; models: GET /v1/models; "
        f"ctrl-c stops)")
    server = uvicorn.Server(server_config(app, log_level=os.environ.get("P2P_SERVE_LOG", "info")))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if not server.started:  # the lifespan never ran: close what it would have
            session.close()
