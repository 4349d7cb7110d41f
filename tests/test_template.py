"""Chat templates: our renderer matches transformers', hostile templates end fast with one-line errors,
and the processor reads a checkpoint's files confined, never blocking, validated."""

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import ARCHS

import mlx_compact
from mlx_compact.files import InputError
from mlx_compact.processor import Processor
from mlx_compact.template import render

ASSET = Path(mlx_compact.__file__).parent / "assets" / "qwen3-vl-tiny"

# A Qwen-style template with tools, tool calls and responses, reasoning and a role check.
TOOLS_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' and messages[0].content is string %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nFunctions you may call:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' ~ tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' and messages[0].content is string %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1, searching=true) %}
{%- for message in messages[::-1] %}
    {%- if ns.searching and message.role == 'user' and message.content is string
          and not message.content.startswith('<tool_response>') %}
        {%- set ns.searching = false %}
        {%- set ns.last_query = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set parts = namespace(text='') %}
        {%- for item in message.content %}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item %}
                {%- set parts.text = parts.text ~ '<|vision_start|><|image_pad|><|vision_end|>' %}
            {%- elif item.type == 'video' or 'video' in item %}
                {%- set parts.text = parts.text ~ '<|vision_start|><|video_pad|><|vision_end|>' %}
            {%- elif 'text' in item %}
                {%- set parts.text = parts.text ~ item.text %}
            {%- endif %}
        {%- endfor %}
        {%- set content = parts.text %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function if call.function else call %}
            {{- '\\n<tool_call>\\n{"name": "' ~ call.name ~ '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif not (message.role == 'system' and loop.first) %}
        {{- raise_exception('Unexpected message role: ' ~ message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Jinja features transformers' environment has: loop controls, generation tags, namespace, dict, tojson options.
FEATURES_TEMPLATE = """\
{%- set sep = joiner(' | ') %}
{%- for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}
{%- if m.role == 'system' %}{% continue %}{% endif %}
{{- sep() }}{{ loop.cycle('odd', 'even') }}:{{ m.role|upper }}
{%- endfor %}
{% generation %}{{ eos_token }}{{ pad_token }}{{ bos_token is defined }}{% endgeneration %}
{{ dict(a=1, b=[1, 2]) | tojson(indent=2, sort_keys=True) }}
{{ {'z': 'é', 'a': none} | tojson(separators=(',', ':')) }} {{ 'é' | tojson(ensure_ascii=True) }}
{{ '%s-%05.1f' % ('x', 3.14159) }} {{ '{}:{:>4}'.format('k', 7) }} {{ 'a,b'.split(',') | join('+') }}
{{ messages | map(attribute='role') | unique | sort | list }} {{ (messages | length) ** 2 }} {{ [1, 2] * 2 + [3] }}
{{ 'ab' ~ 1 ~ none }} {{ range(5) | batch(2) | list }} {{ 'x' | center(9) }}| {{ tools }} {{ documents }}
{% if add_generation_prompt %}GO{% endif %}
"""

IMAGE = Image.new("RGB", (8, 8))
CONVERSATIONS = {
    "image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
    "system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}, {"type": "image"}]},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Thanks!"},
    ],
    "media_objects": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": IMAGE},
                {"type": "image_url", "image_url": {"url": "file://x.png"}},
                {"type": "video", "video": np.zeros((2, 4, 4, 3), np.uint8)},
                {"type": "text", "text": "Compare."},
            ],
        }
    ],
    "none_values": [{"role": "user", "content": "hello", "name": None, "tool_calls": None}],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city, e.g. Zürich",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather in this city?"}]},
    {
        "role": "assistant",
        "content": "<think>\nIt is Paris.\n</think>\n\nLet me check.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 19}'},
    {"role": "assistant", "content": "21 and 19 degrees.", "reasoning": "Both answered."},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def processors(tiny_checkpoint):
    """Our Processor of each tiny checkpoint, and of the bundled Qwen3-VL one (its own template)."""
    out = {arch: Processor.from_pretrained(tiny_checkpoint(arch)) for arch in ARCHS}
    out["bundled_qwen3_vl"] = Processor.from_pretrained(ASSET)
    return out


def _transformers(processor, messages, template=None, **kw):
    return processor.tokenizer.apply_chat_template(
        messages, chat_template=template or processor.chat_template, tokenize=False, **kw
    )


# ---------------------------------------------------------------- same text as transformers


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("source", [*ARCHS, "bundled_qwen3_vl"])
def test_checkpoint_templates_match_transformers(processors, source, conversation, add_generation_prompt):
    ours = processors[source]
    messages = CONVERSATIONS[conversation]
    want = _transformers(ours, messages, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def test_bundled_template_is_the_asset_file(processors):
    ours = processors["bundled_qwen3_vl"]
    assert ours.chat_template == (ASSET / "chat_template.jinja").read_text()
    assert ours.chat_template_source == str(ASSET / "chat_template.jinja")


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("conversation", ["tools", "image", "multi_turn", "media_objects"])
def test_tool_template_matches_transformers(processors, conversation, tools):
    ours = processors["qwen2_vl"]
    messages = TOOL_CONVERSATION if conversation == "tools" else CONVERSATIONS[conversation]
    got = render(
        TOOLS_TEMPLATE,
        messages=messages,
        add_generation_prompt=True,
        tools=tools,
        special_tokens=ours.tokenizer.special_tokens_map,
    )
    assert got == _transformers(ours, messages, TOOLS_TEMPLATE, add_generation_prompt=True, tools=tools)
    assert ("<tools>" in got) == (tools is not None)


def test_features_match_transformers(processors):
    ours = processors["qwen2_vl"]
    messages = TOOL_CONVERSATION
    got = render(
        FEATURES_TEMPLATE,
        messages=messages,
        add_generation_prompt=True,
        special_tokens=ours.tokenizer.special_tokens_map,
    )
    assert got == _transformers(ours, messages, FEATURES_TEMPLATE, add_generation_prompt=True)
    assert "even:USER | odd:ASSISTANT<|im_end|>" in got and "<|im_end|><|endoftext|>False" in got


def test_role_check_raises_the_templates_message(processors):
    messages = [{"role": "robot", "content": "beep"}]
    with pytest.raises(InputError, match="tools.jinja rejects the conversation: Unexpected message role: robot"):
        render(TOOLS_TEMPLATE, messages=messages, name="tools.jinja")


def test_renders_in_threads_alike(processors):
    ours = processors["qwen2_vl"]
    want = ours.apply_chat_template(TOOL_CONVERSATION)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ours.apply_chat_template(TOOL_CONVERSATION))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [want] * 4


def test_trace_function_is_restored():
    def tracer(frame, event, arg):
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        render("{{ messages[0].content }}", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(InputError):
            render(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                messages=[{"role": "user", "content": "x"}],
                time_limit=0.2,
            )
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


# ---------------------------------------------------------------- hostile templates


def _in_thread(fn, timeout: float = 30.0):
    """Run fn() in another thread; (its result or exception, seconds). A hang fails instead of blocking."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["result"] = e

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    return box["result"], time.monotonic() - start


LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE = {  # template -> what the one-line error says (renders with max_output=10_000, time_limit=1)
    "nested_loops": (
        "{% for i in range(9999) %}{% for j in range(9999) %}{% for k in range(9999) %}{% endfor %}"
        "{% endfor %}{% endfor %}",
        "takes longer than 1 s",
    ),
    "exponential_macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(64) }}",
        "takes longer than 1 s",
    ),
    "string_times_huge": ("{{ 'x' * 10**13 }}", "builds a value of more than 10,000 characters"),
    "list_times_huge": ("{{ [0] * 10**13 }}", "builds a value of more than"),
    "center_huge": ("{{ 'x'|center(10**13) }}", "passes a number above 10,000"),
    "ljust_huge": ("{{ 'x'.ljust(10**13) }}", "passes a number above"),
    "range_huge": ("{{ range(10**13)|list }}", "passes a number above"),
    "batch_huge": ("{{ [1]|batch(10**13, 'x')|list }}", "passes a number above"),
    "percent_width": ("{{ '%10000000000000s' % 'x' }}", "width above"),
    "percent_key_width": ("{{ '%(a)10000000000000s' % {'a': 'x'} }}", "width above"),
    "percent_star": ("{{ '%*s' % (10**13, 'x') }}", "width above"),
    "format_width": ("{{ '{:10000000000000}'.format('x') }}", "width above"),
    "format_nested_width": ("{{ '{:{}}'.format('x', 10**13) }}", "width above"),
    "format_filter_width": ("{{ '%10000000000000s'|format('x') }}", "width above"),
    "power": ("{{ 10 ** 100000 }}", "computes a number of more than"),
    "doubling_concat": (
        "{% set ns = namespace(s='x') %}{% for i in range(20) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "builds a value of more than",
    ),
    "doubling_plus": (
        "{% set ns = namespace(s='x') %}{% for i in range(20) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "builds a value of more than",
    ),
    "shared_nesting": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(20) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
        "builds a value of more than",
    ),
    "replace_multiplies": ("{{ ('x' * 1000)|replace('x', 'y' * 1000)|length }}", "builds a value of more than"),
    "join_multiplies": ("{{ range(1000)|join('y' * 1000)|length }}", "builds a value of more than"),
    "indent_multiplies": ("{{ ('\\n' * 1000)|indent(1000)|length }}", "builds a value of more than"),
    "quadratic_sum": (
        "{% set l = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 200 %}{{ l|sum(start=[])|length }}",
        "sums 200 sequences",
    ),
    "block_set_grows": (
        "{% set y = 'y' * 1000 %}{% set x %}{% for i in range(9999) %}{{ y }}{% endfor %}{% endset %}{{ x|length }}",
        "builds a value of more than",
    ),
    "values_in_all": (
        "{% set a = 'y' * 9000 %}" + "".join(f"{{% set v{i} = a ~ {i} %}}" for i in range(100)),
        "characters of values in all",
    ),
    "output": ("{% for i in range(9999) %}xxxxxxxxxx{% endfor %}", "renders more than 10,000 characters"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
    "include": ("{% include 'other.jinja' %}", "uses {% include %} at line 1"),
    "import": ("{% import 'macros.jinja' as m %}", "uses {% import %}"),
    "from_import": ("{% from 'macros.jinja' import m %}", "uses {% import %}"),
    "extends": ("{% extends 'base.jinja' %}", "uses {% extends %}"),
    "raise_exception": (
        "{{ raise_exception('Roles must alternate user/assistant') }}",
        "rejects the conversation: Roles must alternate user/assistant",
    ),
    "syntax_error": ("ok\n{% for x in %}", "has a syntax error at line 2"),
    "error_inside": ("line one\n{{ 1 // 0 }}", "fails at line 2: ZeroDivisionError"),
    "undefined_call": ("{{ nothing() }}", "UndefinedError"),
    # sandbox escapes stay blocked
    "mro": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "globals": ("{{ cycler.__init__.__globals__.os }}", "unsafe"),
    "function_globals": ("{{ raise_exception.__globals__['sys'] }}", "unsafe"),
    "dict_type": ("{{ dict.__call__.__globals__ }}", "unsafe"),
    "mutate_messages": ("{{ messages.append(1) }}", "unsafe"),
    "namespace_underscore": ("{% set ns = namespace(_secret=1) %}", "underscore"),
    "template_context": ("{{ self._TemplateReference__context.parent }}", "unsafe"),
}


@pytest.mark.parametrize("template, message", HOSTILE.values(), ids=HOSTILE)
def test_hostile_templates_end_fast_with_one_line(template, message):
    messages = [{"role": "user", "content": "hi"}]
    error, seconds = _in_thread(
        lambda: render(template, messages=messages, name="evil.jinja", time_limit=1.0, max_output=10_000)
    )
    assert isinstance(error, InputError), repr(error)
    assert str(error).startswith("chat template evil.jinja ") and message in str(error)
    assert "\n" not in str(error)
    assert seconds < 5


@pytest.mark.parametrize("template", ["{{ 'x' * 10**13 }}", "{{ 'x'|center(10**13) }}", LOOPS])
def test_default_limits_refuse(template):
    error, seconds = _in_thread(lambda: render(template, messages=[{"role": "user", "content": "hi"}]))
    assert isinstance(error, InputError), repr(error)
    assert seconds < 6


def test_escapes_render_nothing_secret():
    out = render(
        "{{ '{0.__class__}'.format('') }}|{{ ''.__class__ }}|{{ messages[0].content[0].image }}",
        messages=[{"role": "user", "content": [{"type": "image", "image": IMAGE}]}],
    )
    assert out == "||<Image>"  # the image object itself (and its .save()) never reaches the template


def test_hostile_checkpoint_template_fails_in_apply(checkpoint):
    (checkpoint / "chat_template.jinja").write_text(LOOPS)
    processor = Processor.from_pretrained(checkpoint)
    error, seconds = _in_thread(lambda: processor.build_prompt("hi"))
    assert isinstance(error, InputError) and str(checkpoint / "chat_template.jinja") in str(error)
    assert seconds < 6


# ---------------------------------------------------------------- the processor's file reads


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny Qwen2-VL checkpoint's processor and tokenizer files (no weights), to break."""
    src, dst = tiny_checkpoint("qwen2_vl"), tmp_path / "checkpoint"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def _load(checkpoint):
    """Processor.from_pretrained in another thread: the exception it raised (None if it loaded)."""
    fifos = [f for f in checkpoint.iterdir() if f.is_fifo()]
    try:
        result, seconds = _in_thread(lambda: Processor.from_pretrained(checkpoint), timeout=60)
    finally:
        for fifo in fifos:  # release a reader a regression left blocked
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    return None if isinstance(result, Processor) else result


def _fails(checkpoint, *fragments):
    error = _load(checkpoint)
    assert isinstance(error, InputError), repr(error)
    assert "\n" not in str(error) and all(f in str(error) for f in fragments), str(error)
    return error


def test_hub_snapshot_links_into_blobs_load(checkpoint, tmp_path, processors):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in checkpoint.iterdir():
        shutil.copy(f, repo / "blobs" / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f"blob-{f.name}"))
    assert _load(snapshot) is None
    got = Processor.from_pretrained(snapshot).apply_chat_template(CONVERSATIONS["multi_turn"])
    assert got == processors["qwen2_vl"].apply_chat_template(CONVERSATIONS["multi_turn"])


@pytest.mark.parametrize(
    "name",
    [
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ],
)
def test_link_out_of_the_checkpoint_is_refused(checkpoint, tmp_path, name):
    secret = tmp_path / "secret"
    secret.write_text((checkpoint / name).read_text().replace("<|im_start|>", "TOP-SECRET<|im_start|>"))
    (checkpoint / name).unlink()
    (checkpoint / name).symlink_to(secret)
    error = _fails(checkpoint, name, "outside the checkpoint")
    assert "TOP-SECRET" not in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ],
)
def test_fifo_is_refused_without_blocking(checkpoint, name):
    if name == "chat_template.json":
        (checkpoint / "chat_template.jinja").unlink()  # else the .json is never read
    (checkpoint / name).unlink(missing_ok=True)
    os.mkfifo(checkpoint / name)
    _fails(checkpoint, name, "not a regular file")


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "generation_config.json",
        "chat_template.json",
        "tokenizer_config.json",
    ],
)
@pytest.mark.parametrize("content", ['{"patch_size": 14,', "[1, 2]", "\xff\xfe"])
def test_corrupt_json_names_the_file(checkpoint, name, content):
    if name == "chat_template.json":
        (checkpoint / "chat_template.jinja").unlink()
    (checkpoint / name).write_bytes(content.encode("latin-1"))
    _fails(checkpoint, name)


def test_chat_template_json_must_hold_text(checkpoint):
    (checkpoint / "chat_template.jinja").unlink()
    (checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": ["{{ 1 }}"]}))
    _fails(checkpoint, "chat_template.json", "not text")
    (checkpoint / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages|length }}"}))
    processor = Processor.from_pretrained(checkpoint)
    assert processor.apply_chat_template(CONVERSATIONS["image"]) == "1"
    assert processor.chat_template_source.endswith("chat_template.json")


@pytest.mark.parametrize("content", ["not json at all", '{"model": 5}', '{"version": "1.0", "model": {"type": "BPE"'])
def test_corrupt_tokenizer_is_one_error(checkpoint, content):
    (checkpoint / "tokenizer.json").write_text(content)
    _fails(checkpoint, "cannot load the tokenizer of", str(checkpoint), "download the checkpoint again")


def test_tokenizer_remote_code_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    (checkpoint / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    cfg.update(
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
        vocab_file=str(tmp_path / "elsewhere.json"),
    )
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(cfg))
    _load(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("preprocessor_config.json", "patch_size", "x"),
        ("preprocessor_config.json", "patch_size", 4096),
        ("preprocessor_config.json", "merge_size", 0),
        ("preprocessor_config.json", "temporal_patch_size", 100),
        ("preprocessor_config.json", "max_pixels", -5),
        ("preprocessor_config.json", "max_pixels", 2**40),
        ("preprocessor_config.json", "min_pixels", 10**9),  # above max_pixels
        ("preprocessor_config.json", "rescale_factor", "1/255"),
        ("preprocessor_config.json", "image_mean", [0.5, 0.5]),
        ("preprocessor_config.json", "image_mean", [0.5, "a", 0.5]),
        ("preprocessor_config.json", "image_std", [0.5, 0.0, 0.5]),
        ("preprocessor_config.json", "size", "big"),
        ("video_preprocessor_config.json", "merge_size", 1.5),
        ("generation_config.json", "eos_token_id", "x"),
    ],
)
def test_bad_fields_name_the_field(checkpoint, name, field, value):
    cfg = json.loads((checkpoint / name).read_text())
    cfg[field] = value
    (checkpoint / name).write_text(json.dumps(cfg))
    _fails(checkpoint, name, field)


def test_absent_optional_files_are_fine(checkpoint):
    for name in ("chat_template.jinja", "video_preprocessor_config.json", "generation_config.json"):
        (checkpoint / name).unlink()
    processor = Processor.from_pretrained(checkpoint)
    assert processor.chat_template_source.endswith("tokenizer_config.json")  # the 4.x place of the template
    assert processor.apply_chat_template(CONVERSATIONS["image"]).endswith("<|im_start|>assistant\n")


def test_no_template_at_all_is_an_input_error(checkpoint):
    (checkpoint / "chat_template.jinja").unlink()
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="no chat template"):
        Processor.from_pretrained(checkpoint).build_prompt("hi")
