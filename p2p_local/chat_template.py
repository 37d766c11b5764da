"""A model's chat template (`tokenizer.chat_template`, Jinja), rendered by the app in a bounded sandbox.

Why: a registered GGUF is a file from anywhere, and its template is a program. llama-cpp-python renders it in
jinja2's `ImmutableSandboxedEnvironment`, which stops attribute tricks but bounds neither time nor memory:
`{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}` spins for hours and
`{{ 'x' * 10**10 }}` asks for 10 GB. Here every render has a budget, checked at every point where the template's
code runs (each loop iteration, call, filter, attribute and item lookup, operator, output chunk):

- a deadline (`time_limit`, wall clock) and a number of steps (MAX_STEPS);
- characters made (MAX_WORK_CHARS, all strings and lists the template builds, whether kept or not);
- sizes checked BEFORE an operation that could make a huge value: `*`, `**`, `+`, `%`, `~`, `str.format`,
  `replace`, `join`, `center`, `indent`, ... (MAX_OUTPUT_CHARS characters, MAX_ITEMS items, MAX_INT_BITS);
- the rendered prompt (MAX_OUTPUT_CHARS).

A thread with a timeout would not do: a CPU-bound loop cannot be stopped from outside in the same process. So the
loops themselves are bounded: the parsed template is rewritten before it is compiled, each `{% for %}` iterating
through `_bounded_iter` and each `~` joining through `_bounded_concat` (imported names the template cannot shadow).

Variables and environment options are llama-cpp-python's `Jinja2ChatFormatter`'s (trim_blocks, lstrip_blocks, the
`{% generation %}` pass-through, loop controls, `tojson`), so a normal template renders byte-identically
(tests/test_chat_template.py compares them). String and container methods are limited to the ones chat templates
use (SAFE_METHODS).
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.parser
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from p2p_local.errors import ModelError

MAX_TEMPLATE_CHARS = 100_000  # real chat templates are 1-20 kB
MAX_OUTPUT_CHARS = 1 << 20  # the rendered prompt, and any one string made on the way (~250k tokens)
MAX_WORK_CHARS = 64 << 20  # all characters made during one render
MAX_ITEMS = 100_000  # items of one list made, and a width or count passed to a filter
MAX_STEPS = 1_000_000  # loop iterations, calls, filters, lookups and operators of one render
MAX_INT_BITS = 4096  # an integer made by `*` or `**`
TIME_LIMIT_S = 2.0  # a render takes milliseconds

HINT = "the model's tokenizer.chat_template is broken or hostile; use another instruct GGUF"

# The methods a template may call on a string, list/tuple or dict: what chat templates use, none of which makes a
# value larger than its input (replace, join and format are bounded where they are called).
SAFE_METHODS: dict[type, frozenset[str]] = {
    str: frozenset({"strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith",
                    "lower", "upper", "title", "capitalize", "casefold", "swapcase", "find", "rfind", "index",
                    "rindex", "count", "replace", "join", "format", "format_map", "partition", "rpartition",
                    "removeprefix", "removesuffix", "isdigit", "isalpha", "isalnum", "isspace", "islower",
                    "isupper", "istitle", "isnumeric", "isdecimal"}),
    list: frozenset({"index", "count"}),
    tuple: frozenset({"index", "count"}),
    dict: frozenset({"items", "keys", "values", "get"}),
}
# Filters whose numeric arguments are a width or count: bounded by MAX_ITEMS before they run.
_COUNT_FILTERS = frozenset({"center", "wordwrap", "truncate", "batch", "slice"})


class ChatTemplateError(ModelError):
    """The chat template failed, broke a bound, or produced nothing (a ModelError: exit code 3)."""


class _Exceeded(Exception):
    """A bound was passed (not a jinja2 error: the template cannot turn it into output)."""


class _Raised(Exception):
    """The template's own `raise_exception(message)`."""


class _Budget:
    """One render's allowance; every hook spends from it."""

    def __init__(self, time_limit: float) -> None:
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.steps = 0
        self.chars = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _Exceeded(f"more than {MAX_STEPS:,} steps")
        if time.monotonic() > self.deadline:
            raise _Exceeded(f"more than {self.time_limit:g} s")

    def charge(self, chars: int) -> None:
        self.chars += chars
        if self.chars > MAX_WORK_CHARS:
            raise _Exceeded(f"more than {MAX_WORK_CHARS:,} characters made")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("p2p_chat_template_budget", default=None)


def _budget() -> _Budget:
    """The render's budget. None outside a render: jinja2's compile-time constant folding calls the hooks too,
    and an error there only means "evaluate it when rendering", under the budget."""
    b = _BUDGET.get()
    if b is None:
        raise _Exceeded("outside a render")
    return b


# --- sizes, estimated before a value is made -----------------------------------------------------------------
def weight(x: Any, limit: int = MAX_OUTPUT_CHARS) -> int:
    """About how many characters `str(x)` has (an upper bound for containers), walking no further than past
    `limit`: the cost of stringifying, joining or formatting `x`, known before doing it."""
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v) + 2
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, Namespace):
            total += 16
            stack.append(getattr(v, "_Namespace__attrs", {}))  # its repr shows its attributes
        else:
            total += 32  # floats, None, undefined, functions: short reprs
    return total


def _size(x: Any) -> int:
    """Characters (a string) or items (a list) made by an operation: what it is charged."""
    return len(x) if isinstance(x, str | list | tuple | dict) else 1


def _check_chars(n: int, what: str) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise _Exceeded(f"{what} would make about {n:,} characters (at most {MAX_OUTPUT_CHARS:,})")


def _check_items(n: int, what: str) -> None:
    if n > MAX_ITEMS:
        raise _Exceeded(f"{what} would make {n:,} items (at most {MAX_ITEMS:,})")


def _width(spec: str) -> int:
    """The largest number in a format spec (`>99`, `.5`): the characters a field may pad to."""
    numbers = re.findall(r"\d+", spec)
    if any(len(n) > 7 for n in numbers):
        raise _Exceeded(f"format width {spec[:20]!r} is too large")
    return max((int(n) for n in numbers), default=0)


def _format_size(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """Characters `fmt.format(*args, **kwargs)` may make; a nested width (`{:{w}}`) is refused."""
    n = len(fmt) + weight(list(args)) + weight(dict(kwargs))
    for _, name, spec, _conv in string.Formatter().parse(fmt):
        if name is not None and spec:
            if "{" in spec:
                raise _Exceeded("a nested format width")
            n += _width(spec)
    return n


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _printf_size(fmt: str, values: Any) -> int:
    """Characters `fmt % values` may make; a `*` width (taken from the values) is refused."""
    n = len(fmt) + weight(values)
    for m in _PRINTF.finditer(fmt):
        if "*" in (m.group(1), m.group(2)):
            raise _Exceeded("a '*' width in a % format")
        n += _width(m.group(0))
    return n


def _replace_size(s: str, old: str, new: str, count: int = -1) -> int:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_size(sep: str, items: list[Any]) -> int:
    return len(sep) * max(0, len(items) - 1) + weight(items)


def _bounded_list(items: Iterable[Any], what: str) -> list[Any]:
    """`items` as a list of at most MAX_ITEMS (a generator from `map` is consumed, one step per item)."""
    if isinstance(items, list | tuple | str | dict):
        _check_items(len(items), what)
        return list(items)
    b, out = _budget(), []
    for x in items:
        b.step()
        out.append(x)
        _check_items(len(out), what)
    return out


# --- the hooks the rewritten template calls ----------------------------------------------------------------------
def _bounded_iter(iterable: Any, body_chars: int) -> Iterator[Any]:
    """What every `{% for %}` iterates: one step per item, and the loop body's literal text charged per item
    (a set-block captures it, out of the output's sight)."""
    b = _budget()
    for x in iterable:
        b.step()
        b.charge(body_chars)
        yield x


def _bounded_concat(*parts: Any) -> str:
    """`a ~ b ~ c` (jinja2's str_join), with the result's size known first."""
    _check_chars(sum(weight(p) for p in parts), "'~'")
    out = "".join(map(str, parts))
    _budget().charge(len(out))
    return out


class _Bounded(NodeTransformer):
    """Routes every loop through `_bounded_iter` and every `~` through `_bounded_concat` (as imported names: a
    template's own variable cannot shadow them)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        body = sum(len(d.data) for n in node.body for d in n.find_all(nodes.TemplateData))
        node.iter = _call("_bounded_iter", [node.iter, nodes.Const(body)], node)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return _call("_bounded_concat", node.nodes, node)


def _call(hook: str, args: list[nodes.Expr], at: nodes.Node) -> nodes.Call:
    """A call of this module's `hook` in place of (part of) node `at`."""
    call = nodes.Call(nodes.ImportedName(f"{__name__}.{hook}"), args, [], None, None)
    call.set_lineno(at.lineno)
    call.set_environment(at.environment)
    return call


# --- the environment -----------------------------------------------------------------------------------------
class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for HuggingFace's `{% generation %}` tag (as llama-cpp-python's formatter)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    """Transformers' (and llama-cpp-python's) `tojson`: plain json.dumps, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _finalize(value: Any) -> Any:
    """Every `{{ value }}`: its text's size checked before it is made, and charged."""
    n = weight(value)
    _check_chars(n, "an output value")
    _budget().charge(n)
    return value


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with every operator, call, filter, lookup and output bounded by the render's
    budget (`_Budget`), and only SAFE_METHODS callable on strings and containers."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                         extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols], finalize=_finalize)
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals = {"range": safe_range, "dict": dict, "namespace": Namespace,
                        "cycler": self.globals["cycler"], "joiner": self.globals["joiner"]}  # no lipsum

    # operators
    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _budget().step()
        _check_binop(operator, left, right)
        out = self.binop_table[operator](left, right)
        _budget().charge(_size(out))
        return out

    # calls: macros, methods, globals
    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _budget().step()
        args = _checked_method_args(obj, args, kwargs)
        out = super().call(context, obj, *args, **kwargs)
        _budget().charge(_size(out))
        return out

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        template, is_map = value.__self__, value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map:  # format_map(mapping): the mapping holds the values
                _check_chars(_format_size(template, (), args[0] if args else {}), "str.format_map")
            else:
                _check_chars(_format_size(template, args, kwargs), "str.format")
            return fmt(*args, **kwargs)

        return bounded

    # lookups
    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().step()
        return super().getitem(obj, argument)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        for kind, allowed in SAFE_METHODS.items():
            if isinstance(obj, kind) and callable(value):
                return attr in allowed and super().is_safe_attribute(obj, attr, value)
        return super().is_safe_attribute(obj, attr, value)

    # filters
    @staticmethod
    def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        first = 1 if getattr(f, "jinja_pass_arg", None) else 0  # the value follows a context argument

        @functools.wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            b = _budget()
            b.step()
            _check_filter(name, args[first:], kwargs)
            if name == "join" and len(args) > first:  # a generator (`map`) as a bounded list: its size known
                items = _bounded_list(args[first], "join")
                sep = kwargs.get("d", args[first + 1] if len(args) > first + 1 else "")
                _check_chars(weight(sep) * max(0, len(items) - 1) + weight(items), "join")
                args = (*args[:first], items, *args[first + 1:])
            out = f(*args, **kwargs)
            b.charge(_size(out))
            return out

        return bounded


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse `*`, `**`, `+` or `%` whose result would pass a bound, before it is made."""
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "*":
        if ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Exceeded(f"'*' would make an integer of more than {MAX_INT_BITS} bits")
            return
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and isinstance(seq, str | list | tuple):
            (_check_chars if isinstance(seq, str) else _check_items)(len(seq) * max(n, 0), "'*'")
    elif op == "**":
        if ints and right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise _Exceeded(f"'**' would make an integer of more than {MAX_INT_BITS} bits")
    elif op == "+":
        if isinstance(left, str) and isinstance(right, str):
            _check_chars(len(left) + len(right), "'+'")
        elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
            _check_items(len(left) + len(right), "'+'")
    elif op == "%" and isinstance(left, str):
        _check_chars(_printf_size(left, right), "'%'")


def _checked_method_args(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """The arguments of a call, the methods of SAFE_METHODS that can grow their input (replace, join) sized first;
    a join's iterable comes back as the bounded list it was measured as."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = args[2] if len(args) > 2 and isinstance(args[2], int) else kwargs.get("count", -1)
        _check_chars(_replace_size(owner, args[0], args[1], count), "replace")
    elif name == "join" and args:
        items = _bounded_list(args[0], "join")
        _check_chars(_join_size(owner, items), "join")
        return (items, *args[1:])
    return args


def _check_filter(name: str, args: tuple, kwargs: dict) -> None:
    """Sizes a filter's result may reach, checked before it runs (`args`: the value, then the parameters)."""
    if not args:
        return
    value, params = args[0], list(args[1:]) + list(kwargs.values())
    if isinstance(value, list | tuple | dict | Namespace):  # most filters stringify their value
        _check_chars(weight(value), f"filter {name!r} on a container")
    if name in _COUNT_FILTERS:
        for p in params:
            if isinstance(p, int) and abs(p) > MAX_ITEMS:
                raise _Exceeded(f"filter {name!r} with {p:,} (at most {MAX_ITEMS:,})")
    elif name == "replace" and len(params) >= 2 and all(isinstance(p, str) for p in params[:2]):
        count = params[2] if len(params) > 2 and isinstance(params[2], int) else None
        _check_chars(_replace_size(str(value), params[0], params[1], -1 if count is None else count), "replace")
    elif name == "indent" and params:
        width = params[0]
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_chars(len(str(value)) + (str(value).count("\n") + 1) * pad, "indent")
    elif name == "format":
        _check_chars(_printf_size(str(value), params), "format")
    elif name in ("sum", "unique", "sort") and any(not isinstance(p, int | str | bool | type(None)) for p in params):
        raise _Exceeded(f"filter {name!r} with a container argument")  # sum(start=[]) is quadratic


# --- rendering -----------------------------------------------------------------------------------------------
_ENV = BoundedSandbox()


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """The template parsed, its loops and `~` rewritten (`_Bounded`), compiled; cached (a chat renders each turn)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise _Exceeded(f"the template has {len(template):,} characters (at most {MAX_TEMPLATE_CHARS:,})")
    tree = _ENV.parse(template)
    return _ENV.from_string(_Bounded().visit(tree))


def compiled(template: str) -> jinja2.Template:
    """`template` compiled in the bounded sandbox, or a ChatTemplateError saying why not."""
    try:
        return _compiled(template)
    except _Exceeded as e:
        raise ChatTemplateError(f"the chat template is too large: {e}", hint=HINT) from None
    except Exception as e:  # a syntax error, an unknown filter, nesting past the recursion limit
        raise ChatTemplateError(f"the chat template does not compile: {type(e).__name__}: {_first_line(e)}",
                                hint=HINT) from None


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, time_limit: float = TIME_LIMIT_S) -> str:
    """The prompt `template` makes of `messages`, with llama-cpp-python's variables; ChatTemplateError when the
    template fails, raises, or passes a bound (time, steps, characters made, output size)."""
    tpl = compiled(template)
    budget = _Budget(time_limit)
    token = _BUDGET.set(budget)
    out: list[str] = []
    size = 0
    try:
        for chunk in tpl.generate(messages=messages, eos_token=eos_token, bos_token=bos_token,
                                  raise_exception=_raise_exception, add_generation_prompt=add_generation_prompt,
                                  functions=None, function_call=None, tools=None, tool_choice=None,
                                  strftime_now=_strftime_now):
            budget.step()
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise _Exceeded(f"the prompt passed {MAX_OUTPUT_CHARS:,} characters")
            out.append(chunk)
    except _Exceeded as e:
        raise ChatTemplateError(f"the chat template passed a bound: {e}", hint=HINT) from None
    except _Raised as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {_first_line(e)}",
                                hint="the model's template may not take this conversation's roles") from None
    except Exception as e:  # anything the template's code raised: a sandbox refusal, a type error, recursion
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {_first_line(e)}", hint=HINT) from None
    finally:
        _BUDGET.reset(token)
    return "".join(out)


def _raise_exception(message: str) -> None:
    raise _Raised(str(message)[:300])


def _strftime_now(f: str) -> str:
    return datetime.now().strftime(str(f)[:100])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "no message"


TEST_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "I am an assistant. How can I help?"},
    {"role": "user", "content": "Recommend a movie for tonight."},
)


def check_template(template: str, *, bos_token: str = "", eos_token: str = "") -> str:
    """Render `template` once on TEST_CONVERSATION (system, user, assistant, user: what the app's chat sends);
    the prompt, or ChatTemplateError when it fails, passes a bound or makes no text."""
    prompt = render_chat(template, [dict(m) for m in TEST_CONVERSATION], bos_token=bos_token, eos_token=eos_token)
    if not prompt.strip():
        raise ChatTemplateError("the chat template makes no text from a conversation", hint=HINT)
    if TEST_CONVERSATION[-1]["content"] not in prompt:
        raise ChatTemplateError("the chat template leaves the user's message out of the prompt", hint=HINT)
    return prompt
