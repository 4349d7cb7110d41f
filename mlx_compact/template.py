"""Chat templates: rendered as transformers renders them, but safe to run from a stranger's checkpoint.

`render` gives the text transformers' ``apply_chat_template(..., tokenize=False)`` gives: the same
sandboxed Jinja environment (``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, ``{% generation %}``), the same globals and ``tojson`` filter, and the same data
(messages reduced to plain JSON-like values, the tokenizer's special tokens, ``tools``, ``documents``).

A template is a program from the checkpoint, so on top of the sandbox (no ``__class__``, no
``__globals__``, no mutation of lists and dicts) a render is bounded:

- in time: a trace function (this thread's, restored afterwards) stops compiling and rendering at
  ``time_limit``;
- in memory: before an operator (``* ** % + ~``), a call or a filter builds a value, its size is
  estimated and a value above ``max_output`` characters is refused; every value built (literals and
  slices too) is measured, and all of them together may not exceed 16 times ``max_output``;
- in output: the text is counted as it streams out, at most ``max_output`` characters;
- in reach: ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are refused (a template is one file).

Whatever goes wrong (a syntax error, ``raise_exception``, one of the limits, an error inside the
template) is one `InputError` whose one-line message names the template.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import string
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.runtime
import numpy as np
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

from .files import InputError

MAX_OUTPUT = 4 << 20  # characters; a prompt this long is far past any model's context
MAX_TEMPLATE = 1 << 20  # hub chat templates are a few KiB
MAX_INT_BITS = 8192
TOTAL_FACTOR = 16  # all values built by one render, in units of max_output


def render(
    template: str,
    *,
    messages,
    add_generation_prompt: bool = False,
    special_tokens: Mapping | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    name: str = "chat template",
    time_limit: float = 2.0,
    max_output: int = MAX_OUTPUT,
) -> str:
    """Render a chat template over ``messages``, as transformers does, within limits (see the module docstring).

    ``special_tokens`` is the tokenizer's ``special_tokens_map`` (``bos_token``, ``eos_token``, ...);
    ``tools`` are JSON schemas (dicts); ``name`` (the template's file) is what error messages name.
    Raises `InputError` for anything wrong with the template or refused by the limits.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of message dicts")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise TypeError("tools must be JSON schemas (dicts)")
    data = {
        "messages": [_message(m) for m in messages],
        "tools": _plain(tools),
        "documents": _plain(documents),
        "add_generation_prompt": add_generation_prompt,
        **_plain(dict(special_tokens or {})),
    }
    if not isinstance(template, str):
        raise InputError(f"chat template {name} is not text; fix or replace the checkpoint's chat template")
    if len(template) > MAX_TEMPLATE:
        raise InputError(
            f"chat template {name} is longer than {MAX_TEMPLATE:,} characters, far more than a chat "
            "template holds; fix or replace the checkpoint's chat template"
        )
    limits = _Limits(max_output)
    token = _limits.set(limits)
    try:
        with _deadline(time_limit):
            out, n = [], 0
            for piece in _compile(template).generate(**data):
                n += len(piece)
                if n > max_output:
                    raise _Refused(f"renders more than {max_output:,} characters")
                out.append(piece)
            return "".join(out)
    except _Timeout:
        problem = f"takes longer than {time_limit:g} s to render (a loop that does not end?)"
    except _Raised as e:
        raise InputError(_one_line(f"chat template {name} rejects the conversation: {e.message}")) from None
    except _Refused as e:
        problem = str(e)
    except jinja2.TemplateSyntaxError as e:
        problem = f"has a syntax error at line {e.lineno}: {e.message}"
    except SecurityError as e:
        problem = f"tries an unsafe operation ({e})"
    except RecursionError:
        problem = "recurses too deeply"
    except MemoryError:
        problem = "runs out of memory"
    except Exception as e:  # anything else a template can make Python raise
        problem = f"fails{_line(e)}: {type(e).__name__}: {e}"
    finally:
        _limits.reset(token)
    raise InputError(_one_line(f"chat template {name} {problem}; fix or replace the checkpoint's chat template"))


# ---------------------------------------------------------------- errors and limits


class _Refused(Exception):
    """A limit refused an operation; the message says which."""


class _Timeout(BaseException):
    """The deadline passed (a BaseException, so that no ``except Exception`` on the way swallows it)."""


class _Raised(jinja2.TemplateError):
    """The template called ``raise_exception``."""


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _line(e: BaseException) -> str:
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line else ""


@contextmanager
def _deadline(seconds: float):
    """Raise `_Timeout` in this thread once ``seconds`` have passed (checked at every Python call and at
    every line of template code: template loops make no calls)."""
    end = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > end:
            raise _Timeout
        return trace if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


class _Limits:
    """The size limits of one render: each value at most ``size``, all values built at most TOTAL_FACTOR x ``size``."""

    def __init__(self, size: int):
        self.size, self.left = size, TOTAL_FACTOR * size

    def check(self, n: int) -> None:
        if n > self.size:
            raise _Refused(f"builds a value of more than {self.size:,} characters")

    def made(self, value):
        """``value`` was just built: refuse it if too large, count it against the total; return it."""
        t = type(value)
        if issubclass(t, (str, bytes)):
            if len(value) > self.size:
                self.check(len(value))
            self.left -= len(value)
        elif issubclass(t, _CONTAINERS):
            _size(value, self.size)
            self.left -= 8 * len(value) if issubclass(t, (list, tuple, dict, set)) else 0
        elif hasattr(t, "__next__"):  # an iterator (a filter's generator): measure what it yields
            return self._each(value)
        if self.left < 0:
            raise _Refused(f"builds more than {TOTAL_FACTOR * self.size:,} characters of values in all")
        return value

    def _each(self, items):
        for item in items:
            yield self.made(item)

    def ints(self, args, kwargs) -> None:
        """Refuse int arguments (widths, counts, repeats) above the value size."""
        for a in itertools.chain(args, kwargs.values()) if kwargs else args:
            if issubclass(type(a), int) and abs(a) > self.size:
                raise _Refused(f"passes a number above {self.size:,} as an argument")


_limits: ContextVar[_Limits] = ContextVar("template_limits")
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)
_DICT_ATTRIBUTES = frozenset(dir(dict))


def _size(value, limit: int, item: int = 2, per_depth: int = 0, depth: int = 1, seen: dict | None = None) -> int:
    """About how many characters ``value`` takes as text (JSON with ``item`` / ``per_depth`` overheads).

    Refuses (`_Refused`) as soon as the count passes ``limit``. Shared parts count each time they
    appear (``[a, a]`` prints ``a`` twice) but are walked once (``seen``), so nesting cannot hide a
    huge value nor make the walk long.
    """
    t = type(value)  # type checks, not isinstance: a Namespace answers __class__ in Python
    if issubclass(t, (str, bytes)):
        n = len(value)
    elif issubclass(t, _CONTAINERS):
        key = (id(value), depth if per_depth else 0)
        if seen is None:
            seen = {}
        elif key in seen:
            n = seen[key]
            if n > limit:
                raise _Refused(f"builds a value of more than {_limits.get().size:,} characters")
            return n
        seen[key] = 8  # a namespace holding itself prints as "{...}"
        if issubclass(t, Namespace):
            value = value._Namespace__attrs
        children = itertools.chain.from_iterable(value.items()) if issubclass(type(value), dict) else value
        n, step = 2, item + per_depth * depth
        for child in children:
            n += step + (
                len(child) if type(child) is str else _size(child, limit - n, item, per_depth, depth + 1, seen)
            )
            if n > limit:
                break
        seen[key] = n
    elif issubclass(t, int):
        n = value.bit_length() // 3 + 1
    else:
        n = 8
    if n > limit:
        raise _Refused(f"builds a value of more than {_limits.get().size:,} characters")
    return n


# ---------------------------------------------------------------- size estimates of what is about to be built


_SEQUENCES = (str, bytes, list, tuple)


def _binop_size(op: str, left, right, limit: int) -> int:
    ints = issubclass(type(left), int), issubclass(type(right), int)
    if op == "**" and all(ints) and right > 0 and abs(left) > 1:
        if left.bit_length() * min(right, MAX_INT_BITS) > MAX_INT_BITS:
            raise _Refused(f"computes a number of more than {MAX_INT_BITS} bits")
    elif op == "*" and all(ints):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _Refused(f"computes a number of more than {MAX_INT_BITS} bits")
    elif op == "*" and any(ints):
        seq, times = (right, left) if ints[0] else (left, right)
        if issubclass(type(seq), _SEQUENCES) and times > 0:
            return _size(seq, limit) * times
    elif op == "+" and issubclass(type(left), _SEQUENCES) and issubclass(type(right), _SEQUENCES):
        return _size(left, limit) + _size(right, limit)
    elif op == "%" and issubclass(type(left), (str, bytes)):
        return _percent_size(left, right, limit)
    return 0


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?([^a-zA-Z%]*)")  # "-08.3" of "%(key)-08.3f"
_DIGITS = re.compile(r"\d+")


def _check_widths(specs, limit: int) -> None:
    for spec in specs:
        if "*" in spec or "{" in spec or any(len(d) > 9 or int(d) > limit for d in _DIGITS.findall(spec)):
            raise _Refused(f"formats with a width above {limit:,} (or one taken from the arguments)")


def _percent_size(fmt, args, limit: int) -> int:
    _check_widths(_PERCENT_SPEC.findall(fmt if isinstance(fmt, str) else fmt.decode("latin-1")), limit)
    return len(fmt) + fmt.count("%") * _size(args, limit)


def _format_size(fmt: str, args, kwargs, limit: int) -> int:
    _check_widths((spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec), limit)
    return len(fmt) + fmt.count("{") * _size([args, kwargs], limit)


def _replace_size(s, old, new, count=-1) -> int:
    if not (isinstance(s, (str, bytes)) and type(old) is type(s) and type(new) is type(s)):
        return 0  # replace() itself refuses these
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(items, sep, limit: int) -> int:
    return _size(items, limit) + len(str(sep)) * max(len(items) - 1, 0)


def _method_size(s, name: str, args, kwargs, limit: int) -> int:
    """The size of ``s.<name>(*args)`` for the str / bytes methods that can multiply sizes."""
    if name == "replace" and len(args) >= 2:
        return _replace_size(s, *args[:3])
    if name == "join" and args:
        return _join_size(args[0], s, limit)
    if name == "translate" and args and isinstance(args[0], Mapping):
        return len(s) * max([_size(v, limit) for v in args[0].values()] + [1])
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * tab if isinstance(tab, int) else 0
    if name == "format" and isinstance(s, str):
        return _format_size(s, args, kwargs, limit)
    if name == "format_map" and isinstance(s, str):
        return _format_size(s, (), args[0] if args else {}, limit)
    return 0


def _wordwrap_size(limit, s, /, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True) -> int:
    s = str(s)
    lines = len(s) // max(width, 1) + s.count("\n") + 1 if isinstance(width, int) else 1
    return len(s) + lines * len(str("\n" if wrapstring is None else wrapstring))


def _indent_size(limit, s, /, width=4, first=False, blank=False) -> int:
    s = str(s)
    return len(s) + (s.count("\n") + 1) * (max(width, 0) if isinstance(width, int) else len(str(width)))


def _tojson_size(limit, x, /, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> int:
    per_depth = indent if isinstance(indent, int) else 0 if indent is None else len(str(indent))
    item = 4 if separators is None else 2 + sum(len(str(s)) for s in separators)
    return _size(x, limit, item, max(per_depth, 0)) * (6 if ensure_ascii else 1)


def _sum_size(limit, iterable, /, attribute=None, start=0) -> int:
    if not issubclass(type(start), _SEQUENCES):
        return 0
    n = _size(iterable, limit) + _size(start, limit)
    if len(iterable) * n > TOTAL_FACTOR * limit:  # sum() copies the growing sequence at every step
        raise _Refused(f"sums {len(iterable):,} sequences (quadratic work)")
    return n


_FILTER_SIZES = {  # filters that can multiply sizes: (limit, *their arguments) -> size of their result
    "replace": lambda limit, s, old, new, /, count=None: _replace_size(
        str(s), str(old), str(new), -1 if count is None else count
    ),
    "join": lambda limit, value, /, d="", attribute=None: _join_size(value, d, limit),
    "format": lambda limit, value, /, *args, **kwargs: _percent_size(str(value), kwargs or args, limit),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "tojson": _tojson_size,
    "sum": _sum_size,
}
_SIZE_FILTERS = {"batch", "center", "indent", "slice", "truncate", "urlize", "wordwrap"}  # int arguments are sizes


# ---------------------------------------------------------------- the environment


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with ``~`` joins, literals and slices measured by the environment."""

    def visit_Concat(self, node, frame):
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _measured(visit):
        def measured(self, node, frame):
            if getattr(node, "ctx", "load") != "load" or (
                isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Slice)
            ):
                return visit(self, node, frame)
            self.write("environment.made(")
            visit(self, node, frame)
            self.write(")")

        return measured

    visit_List = _measured(CodeGenerator.visit_List)
    visit_Tuple = _measured(CodeGenerator.visit_Tuple)
    visit_Dict = _measured(CodeGenerator.visit_Dict)
    visit_Getitem = _measured(CodeGenerator.visit_Getitem)
    del _measured


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' chat template sandbox, with every value-building operation measured first."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(("*", "**", "%", "+"))

    def call_binop(self, context, operator, left, right):
        limits = _limits.get()
        if not (
            type(left) is int
            and type(right) is int
            and operator != "**"
            and left.bit_length() < 64
            and right.bit_length() < 64
        ):  # the common case: small numbers
            n = _binop_size(operator, left, right, limits.size)
            if n > limits.size:
                limits.check(n)
        return limits.made(self.binop_table[operator](left, right))

    def call(self, context, obj, /, *args, **kwargs):
        limits = _limits.get()
        method = getattr(obj, "__wrapped__", obj)  # str.format arrives wrapped by the sandbox
        receiver, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        if isinstance(receiver, (str, bytes)):
            if name == "join" and args and hasattr(type(args[0]), "__next__"):
                args = (list(args[0]), *args[1:])
            if name not in ("format", "format_map"):  # their ints are values, their widths are checked
                limits.ints(args, kwargs)
            limits.check(_method_size(receiver, name, args, kwargs, limits.size))
        elif not (
            issubclass(type(obj), (jinja2.runtime.Macro, _TemplateDict))
            or obj is _TemplateNamespace
            or obj is _raise_exception
        ):
            limits.ints(args, kwargs)  # range(), lipsum(), int.to_bytes(), ...: int arguments are sizes
        return limits.made(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        # fast paths for the common cases (message.role, ns.value), with the same result as the sandbox's
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            value = obj.get(attribute, self)
        elif type(obj) is _TemplateNamespace and not attribute.startswith("_"):
            value = object.__getattribute__(obj, "_Namespace__attrs").get(attribute, self)
        else:
            value = self
        return super().getattr(obj, attribute) if value is self else value

    def concat(self, pieces):
        """Join output pieces or ``~`` operands (``str`` of each), refusing a result above the limit."""
        limits = _limits.get()
        pieces, n = list(pieces), 0
        for i, p in enumerate(pieces):
            if not issubclass(type(p), str):
                _size(p, limits.size)
                pieces[i] = p = str(p)
            n += len(p)
        limits.check(n)
        return limits.made("".join(pieces))

    @staticmethod
    def made(value):
        return _limits.get().made(value)


def _guard_filter(name: str, func):
    """``func`` with its arguments checked and its result measured (see `_Limits`)."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context / environment comes first
    estimate = _FILTER_SIZES.get(name)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        limits = _limits.get()
        if name in _SIZE_FILTERS:
            limits.ints(args[skip + 1 :], kwargs)
        if name in ("join", "sum") and len(args) > skip and hasattr(type(args[skip]), "__next__"):
            args = (*args[:skip], list(args[skip]), *args[skip + 1 :])
        if estimate is not None:
            limits.check(estimate(limits.size, *args[skip:], **kwargs))
        return limits.made(func(*args, **kwargs))

    return guarded


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    """``dict`` for templates: a call and ``fromkeys``, none of the type's other attributes (as transformers)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """``namespace`` for templates: no underscore attributes (as transformers)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}"
            )


def _raise_exception(message):
    raise _Raised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _make_environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _guard_filter(name, f) for name, f in env.filters.items()})
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return env


_ENVIRONMENT = _make_environment()
_LOADS = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    tree = _ENVIRONMENT.parse(source)
    for node in tree.find_all(_LOADS):
        tag = {nodes.Extends: "extends", nodes.Include: "include"}.get(type(node), "import")
        raise _Refused(f"uses {{% {tag} %}} at line {node.lineno}, which a chat template cannot (it is one file)")
    return _ENVIRONMENT.from_string(tree)


# ---------------------------------------------------------------- the data a template sees


def _plain(value):
    """What a template may see of a value (transformers' ``_plain_template_data``): JSON-like data only."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"  # images, arrays, ...: templates only test that the key is there


_REASONING = ("reasoning_content", "thinking", "reasoning")


def _message(message) -> dict:
    """One message as transformers hands it to templates: plain, no None values, reasoning under all its names."""
    message = _plain(message)
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message
