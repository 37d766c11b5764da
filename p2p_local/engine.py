"""The llama.cpp engine: one quantized base loaded once, LoRA adapters attached and switched per request.

Why the low-level adapter API: llama-cpp-python's `Llama(lora_path=...)` fixes one adapter per instance
and does not raise on a bad one (the first eval segfaults). Here adapters are validated in Python
(`adapter.validate_adapter`), then loaded with `llama_adapter_lora_init` and attached with a scale via
`llama_set_adapters_lora`; every switch resets llama-cpp-python's prompt cache, which would otherwise
reuse a prefix computed under another adapter.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_chat_format as llama_chat_format
import numpy as np

from p2p_local.adapter import BaseInfo, LoraAdapter, validate_adapter
from p2p_local.errors import EngineError

# llama.cpp logs through one global callback: keep its lines (for error messages), print none.
_LOG: deque[str] = deque(maxlen=200)
_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR (3 is WARN)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace")
    _LOG.append(f"{'E' if level == _LOG_ERROR else ' '} {line.rstrip()}")
    if os.environ.get("P2P_LLAMA_LOG"):
        print(line, end="", flush=True)


_NATIVE_LOG = ctypes.cast(None, llama_cpp.llama_log_callback)  # NULL: llama.cpp's own logger (stderr)


def _quiet_llama() -> None:
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def recent_llama_errors(n: int = 8) -> str:
    errors = [line[2:] for line in _LOG if line.startswith("E")]
    return "\n".join(errors[-n:]) or "(llama.cpp logged no error)"


def default_threads() -> int:
    """All cores: llama-cpp-python's own default is cpu_count()//2, i.e. 1 thread on a 2-core laptop.
    `P2P_THREADS` overrides (a machine shared with other work: llama.cpp's threads spin-wait, so more
    threads than free cores slows it down many times over)."""
    env = os.environ.get("P2P_THREADS")
    if env:
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def default_gpu_layers() -> int:
    """Offload every layer when llama.cpp was built with Metal/CUDA/Vulkan; `P2P_GPU_LAYERS` overrides."""
    env = os.environ.get("P2P_GPU_LAYERS")
    if env is not None:
        return int(env)
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


@dataclass
class Adapter:
    """A LoRA adapter loaded into llama.cpp. Free it with `Engine.free_adapter` (or `Engine.close`)."""

    path: Path
    ptr: object
    info: LoraAdapter


def bounded_chat_handler(llm: llama_cpp.Llama, template: str) -> llama_chat_format.LlamaChatCompletionHandler:
    """llama-cpp-python's chat handler for the GGUF's template (`Jinja2ChatFormatter.to_chat_handler()`: the same
    tokens, stop string and stop token), its prompt rendered by `chat_template.render_chat`: bounded in time and
    size, a ChatTemplateError (a ModelError) when the template fails or passes a bound."""
    from p2p_local.chat_template import render_chat

    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""  # as Llama.__init__ reads them
    bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""

    def stop_on_eos(tokens: np.ndarray, logits: np.ndarray) -> bool:
        return tokens[-1] == eos_id

    def format_chat(*, messages: list[dict], **_: object) -> llama_chat_format.ChatFormatterResponse:
        return llama_chat_format.ChatFormatterResponse(
            prompt=render_chat(template, messages, bos_token=bos, eos_token=eos), stop=[eos],
            stopping_criteria=llama_cpp.StoppingCriteriaList([stop_on_eos]), added_special=True)

    return llama_chat_format.chat_formatter_to_chat_completion_handler(format_chat)


class Engine:
    """A loaded GGUF base model. Thread-safe: one request at a time (a lock guards llama.cpp state)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        sha256: str | None = None,
        seed: int = 0,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"model file not found: {self.model_path}", hint="run `p2p models prepare`")
        if sha256 is None:
            from p2p_local.models import known_models

            sha256 = next((s.sha256 for s in known_models().values() if s.filename == self.model_path.name), "")
        # Read shapes first: a file gguf cannot parse must never reach llama.cpp.
        try:
            self.base = BaseInfo.from_gguf(self.model_path, sha256)
        except Exception as e:
            from p2p_local.models import repair_hint

            raise EngineError(f"{self.model_path} is not a loadable GGUF model: {e}",
                              hint=repair_hint(self.model_path)) from e
        self.n_threads = n_threads or default_threads()
        self.n_gpu_layers = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
        self._lock = threading.RLock()
        self._adapters: list[Adapter] = []
        self.last_finish: str | None = None  # how the last generation ended: "stop" or "length" (its budget)
        self.active: tuple[Adapter | None, float] = (None, 0.0)
        self._kv_prompt: list[int] | None = None  # a prompt `branches` left in llama.cpp's cache (same adapter)
        try:
            self.llm = self._llama(n_ctx, seed, keep_log=False)
        except Exception:
            try:  # loaded again with its log kept, which says why
                self.llm = self._llama(n_ctx, seed, keep_log=True)
            except Exception as e:
                raise EngineError(f"llama.cpp could not load {self.model_path.name}: {recent_llama_errors()}",
                                  hint="the file may be corrupt or of an architecture this llama.cpp lacks") from e
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        # An instruct model's own chat template (llama.cpp's chat completion applies it); None for a base.
        self.chat_template: str | None = self.llm.metadata.get("tokenizer.chat_template") or None
        if self.chat_template and self.llm.chat_format == "chat_template.default":
            # llama-cpp-python would render it with jinja2, unbounded: the app's sandbox renders it instead
            # (llama.cpp's own formats, picked for templates it recognises, are Python and need no bound).
            self.llm.chat_handler = bounded_chat_handler(self.llm, self.chat_template)

    def _llama(self, n_ctx: int, seed: int, keep_log: bool) -> llama_cpp.Llama:
        """`keep_log` False: llama.cpp's own logger writes the load's ~1,400 lines to the silenced stderr. Through
        the Python callback each line takes the GIL, which the commit hook's imports hold while it loads
        (~40 ms later on 2 cores)."""
        llama_cpp.llama_log_set(_log_callback if keep_log else _NATIVE_LOG, ctypes.c_void_p(0))
        try:
            with _silence_stderr():
                return llama_cpp.Llama(
                    str(self.model_path), n_ctx=n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads,
                    n_gpu_layers=self.n_gpu_layers, seed=seed, verbose=False,
                )
        finally:
            _quiet_llama()

    # --- adapters ---------------------------------------------------------------------------------
    def load_adapter(self, path: str | Path, *, check_base_hash: bool = True) -> Adapter:
        """Validate an adapter against this base in Python, then load it into llama.cpp."""
        path = Path(path)
        info = validate_adapter(path, self.base, check_base_hash=check_base_hash)
        with self._lock:
            ptr = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not ptr:  # a NULL pointer is falsy but not None
                raise EngineError(f"llama.cpp refused adapter {path}: {recent_llama_errors()}")
            adapter = Adapter(path=path, ptr=ptr, info=info)
            self._adapters.append(adapter)
        return adapter

    def use(self, adapter: Adapter | None, scale: float = 1.0) -> None:
        """Attach `adapter` at `scale` (None or scale 0 detaches). Resets the prompt cache."""
        with self._lock:
            if adapter is None or scale == 0.0:
                llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
                self.active = (None, 0.0)
            else:
                ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter.ptr)
                scales = (ctypes.c_float * 1)(float(scale))
                rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, ptrs, 1, scales)
                if rc != 0:
                    raise EngineError(f"llama.cpp could not attach {adapter.path.name} (code {rc})")
                self.active = (adapter, float(scale))
            self.llm.reset()
            self._kv_prompt = None

    def free_adapter(self, adapter: Adapter) -> None:
        with self._lock:
            if self.active[0] is adapter:
                self.use(None)
            if adapter in self._adapters:
                self._adapters.remove(adapter)
                llama_cpp.llama_adapter_lora_free(adapter.ptr)

    # --- text ---------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        top_k: int = 40,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> Iterator[str]:
        """Stream text pieces. temperature 0 = greedy. Closing the iterator cancels generation.
        `last_finish` then says why it ended: "stop" (a stop string or end of text) or "length" (max_tokens)."""
        with self._lock:
            self.last_finish = None
            self._kv_prompt = None
            n_prompt = len(self.tokenize(prompt))
            max_tokens = max(1, min(max_tokens, self.n_ctx - n_prompt - 1))
            if n_prompt >= self.n_ctx - 1:
                raise EngineError(f"prompt of {n_prompt} tokens does not fit the context ({self.n_ctx})",
                                  hint="shorten the input or the profile shown in the prompt")
            try:
                stream = self.llm.create_completion(
                    prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stop=list(stop) or None, stream=True, seed=seed,
                )
                for chunk in stream:
                    choice = chunk["choices"][0]
                    self.last_finish = choice.get("finish_reason") or self.last_finish
                    if choice["text"]:
                        yield choice["text"]
            except (RuntimeError, ValueError) as e:
                raise EngineError(f"generation failed: {e}: {recent_llama_errors()}") from e

    def chat(self, messages: Sequence[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 0.95, top_k: int = 40, seed: int | None = None) -> Iterator[str]:
        """Stream a reply to `messages` ({"role", "content"}) through the GGUF's own chat template
        (llama.cpp's chat completion). Sets `last_finish` as `generate` does; closing cancels."""
        if not self.chat_template:
            raise EngineError(f"{self.model_path.name} has no chat template (tokenizer.chat_template)",
                              hint="free chat needs an instruct model with one: `p2p models add FILE --name N`")
        with self._lock:
            self.last_finish = None
            self._kv_prompt = None
            # No prefix reuse: a reused prompt cache decodes in other batches, and the reply then drifts
            # from the same question asked fresh (the chat and `p2p ask` must agree).
            self.llm.reset()
            try:
                stream = self.llm.create_chat_completion(
                    list(messages), max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    stream=True, seed=seed)
                for chunk in stream:
                    choice = chunk["choices"][0]
                    self.last_finish = choice.get("finish_reason") or self.last_finish
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        yield piece
            except (RuntimeError, ValueError) as e:
                raise EngineError(f"chat generation failed: {e}",
                                  hint="a long conversation may not fit the context: start a new one") from e

    def complete(self, prompt: str, **kw) -> str:
        return "".join(self.generate(prompt, **kw))

    def last_logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Logits (float32 [n_vocab]) at the prompt's last position, under the attached adapter."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= self.n_ctx:
            raise EngineError(f"prompt of {len(tokens)} tokens does not fit the context ({self.n_ctx})")
        with self._lock:
            self.llm.reset()  # no prefix reuse: logits must come from exactly this setup
            self._kv_prompt = None
            self.llm.eval(tokens)
            ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def continuation_logprobs(self, prompt: str, continuation: Sequence[int]) -> np.ndarray:
        """Teacher-forced log-probabilities (float64 [n]) of `continuation`'s tokens after `prompt`, under
        the attached adapter: the prompt is decoded, then the continuation in one batch whose logits are
        all read, so the cost is one prompt eval plus one short batch."""
        from llama_cpp._internals import LlamaBatch

        tokens = self.tokenize(prompt)
        cont = [int(t) for t in continuation]
        if not cont:
            return np.zeros(0)
        if len(tokens) + len(cont) >= self.n_ctx:
            raise EngineError(f"prompt + continuation of {len(tokens) + len(cont)} tokens do not fit the context ({self.n_ctx})")
        out = np.empty(len(cont))
        with self._lock:
            if self._kv_prompt == tokens and len(tokens) > 1:  # just answered by `branches`: its cache holds the
                self.llm.n_tokens = len(tokens) - 1  # prompt; only the last position is decoded again
                self.llm.eval(tokens[-1:])
            else:
                self.llm.reset()
                self.llm.eval(tokens)  # logits at the prompt's last position predict cont[0]
            self._kv_prompt = None
            first = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
            out[0] = _log_softmax_at(first, cont[0])
            rest = cont[:-1]
            step = max(1, self.llm.n_batch)  # llama.cpp asserts (aborts) on a batch over n_batch tokens
            for start in range(0, len(rest), step):
                chunk = rest[start:start + step]
                batch = LlamaBatch(n_tokens=len(chunk), embd=0, n_seq_max=1)
                batch.set_batch(chunk, n_past=len(tokens) + start, logits_all=True)
                rc = llama_cpp.llama_decode(self.llm.ctx, batch.batch)
                if rc != 0:
                    raise EngineError(f"llama_decode returned {rc}: {recent_llama_errors()}")
                for i in range(len(chunk)):
                    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, i), shape=(self.n_vocab,))
                    out[start + i + 1] = _log_softmax_at(row, cont[start + i + 1])
            self.llm.reset()
        return out

    def branches(self, prompt: str, n: int, max_tokens: int) -> list[tuple[str, float, int]]:
        """Greedy one-line continuations of `prompt` from each of its `n` most likely first tokens (the
        first is the greedy answer itself): [(text, summed log-probability, tokens)], in first-token order.
        A line ends at a newline or the end of text. The prompt is evaluated once; each branch then costs
        one single-token decode a token (llama.cpp drops the cache past the prompt before each branch)."""
        tokens = self.tokenize(prompt)
        if len(tokens) + max_tokens >= self.n_ctx:
            max_tokens = self.n_ctx - len(tokens) - 1
        if max_tokens < 1:
            raise EngineError(f"prompt of {len(tokens)} tokens does not fit the context ({self.n_ctx})",
                              hint="shorten the input or the profile shown in the prompt")
        eos = self.llm.token_eos()
        out: list[tuple[str, float, int]] = []
        with self._lock:
            self.llm.reset()
            self.llm.eval(tokens)
            first = _log_softmax(self._logits())
            for t0 in np.argsort(-first)[: max(1, n)]:
                t, lp, ids = int(t0), float(first[t0]), []
                self.llm.n_tokens = len(tokens)  # back to the prompt: the next eval drops the branch's cache
                while t != eos:
                    ids.append(t)
                    if "\n" in self.detokenize([t]) or len(ids) >= max_tokens:
                        break
                    self.llm.eval([t])
                    row = _log_softmax(self._logits())
                    t = int(np.argmax(row))
                    lp += float(row[t])
                out.append((self.detokenize(ids), lp, max(1, len(ids))))
            self.llm.reset()  # what llama-cpp-python's own calls see: nothing to reuse
            self._kv_prompt = tokens  # what `continuation_logprobs` may reuse (the cache keeps the prompt)
        return out

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for adapter in list(self._adapters):
                self.free_adapter(adapter)
            if getattr(self, "llm", None) is not None:
                self.llm.close()
                self.llm = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _silence_stderr() -> Iterator[None]:
    """llama.cpp prints some warnings straight to fd 2 (e.g. 'cannot use buft CPU_REPACK'): hide them."""
    if os.environ.get("P2P_LLAMA_LOG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    x = logits.astype(np.float64)
    m = float(x.max())
    return float(x[token] - m - np.log(np.exp(x - m).sum()))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())
