"""Tools of a multi-turn rollout: their JSON schemas, finding the calls in a model's turn, and running them.

A tool is a plain Python function (or an environment's method) with type hints and a Google-style docstring,
as TRL and ``transformers`` want them: its schema, ``transformers.utils.get_json_schema``, is what a chat
template shows the model (``apply_chat_template(tools=...)``).

A *parser* turns the text of one model turn into the calls it makes: ``str -> [{"name": str, "arguments":
dict}, ...]`` (an empty list: no call, the episode ends). ``tool_call_parser`` picks one:

* ``hermes``: Hermes / Qwen JSON calls, ``<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>``, any
  number of them in a turn;
* ``compact``: one call per line that starts with ``!``: ``!name arg1 arg2`` (arguments in the tool's parameter
  order, or ``key=value``; each read as JSON when it parses, else as a string; quotes group words). A name may
  be cut to any prefix that only one tool has, so with a single tool a bare ``!`` calls it. Meant for tiny
  models and character tokenizers, where every character of a call is a token to discover;
* ``auto`` (the default): ``hermes`` for chat prompts, ``compact`` for plain-string prompts;
* a callable with that signature, or ``"module:function"`` naming one.

A parser raises ``ValueError`` for a call it cannot read; like a call that raises, times out or names no tool,
that becomes a tool message the model reads (TRL's ``{'error': ...}``) and counts as a failed call.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import shlex
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PARSERS = ("auto", "hermes", "compact")
"""The built-in ``tool_call_parser`` names."""
REWARD_METHODS = ("get_reward", "reward")
"""Environment methods that are a reward, not a tool: TRL's ``get_reward``, or ``reward``."""
NOT_TOOLS = ("reset", *REWARD_METHODS)

ToolCall = dict
"""``{"name": str, "arguments": dict}``, one call found in a model's turn."""


@dataclass(frozen=True)
class Tool:
    """A callable the model may call, with what a chat template and the ``compact`` parser need of it."""

    name: str
    func: Callable
    schema: dict
    """``transformers.utils.get_json_schema(func)``: ``{"type": "function", "function": {...}}``."""
    parameters: tuple[str, ...]
    """Argument names in signature order (how ``compact`` maps positional arguments)."""


def make_tool(func: Callable, owner: str | None = None) -> Tool:
    """``func`` as a ``Tool``; ``owner`` (an environment class name) only names it in errors."""
    from transformers.utils import get_json_schema

    name = getattr(func, "__name__", None) or type(func).__name__
    where = f" (a method of environment {owner})" if owner else ""
    if not callable(func):
        raise ValueError(f"tool {func!r}{where} is not callable; tools are functions with type hints and a docstring")
    try:
        schema = get_json_schema(func)
    except Exception as e:
        raise ValueError(f"tool {name!r}{where}: cannot build its JSON schema ({e}); a tool needs type hints on "
                         "its arguments and a Google-style docstring describing it and each argument "
                         "(transformers.utils.get_json_schema)") from None
    parameters = tuple(schema["function"].get("parameters", {}).get("properties", {}))
    return Tool(name=name, func=func, schema=schema, parameters=parameters)


def make_tools(funcs: Sequence[Callable], owner: str | None = None) -> list[Tool]:
    """``make_tool`` of each; two tools with one name are an error (the model could not tell them apart)."""
    tools = [make_tool(f, owner) for f in funcs]
    names = [t.name for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two tools are named {twice[0]!r}; tool names must be unique")
    return tools


def environment_methods(env: Any) -> list[Callable]:
    """An environment's tools: the public methods of its class, bound to it, but ``reset`` and the reward
    methods (``REWARD_METHODS``), as TRL lists them (properties are not methods, so not tools)."""
    return [getattr(env, name) for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if not name.startswith("_") and name not in NOT_TOOLS]


# ----------------------------------------------------------------------------------------------------------
# parsers: the text of one model turn -> the calls in it


HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in ``text`` (Hermes, Qwen2.5/3).
    ``arguments`` may also be a JSON string of the object. ValueError on a block that is not such a call."""
    calls = []
    for block in HERMES_RE.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call {block!r} is not valid JSON ({e.msg})") from None
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            raise ValueError(f"tool call {block!r} must be an object with a string 'name' and an 'arguments' object")
        calls.append({"name": call["name"], "arguments": arguments})
    return calls


class CompactParser:
    """The ``compact`` format (see the module docstring) for a given set of tools."""

    def __init__(self, tools: Sequence[Tool]):
        self.tools = {t.name: t for t in tools}

    def resolve(self, name: str) -> str:
        """The tool a (possibly cut) name means: itself, else the only tool it is a prefix of."""
        if name in self.tools:
            return name
        matches = [t for t in self.tools if t.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            return name  # unknown: the call reports it
        raise ValueError(f"tool name {name!r} is ambiguous: it starts {', '.join(sorted(matches))}")

    def __call__(self, text: str) -> list[ToolCall]:
        calls = []
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("!"):
                continue
            try:
                words = shlex.split(line[1:])
            except ValueError:
                words = line[1:].split()
            name = self.resolve(words[0] if words else "")
            if name not in self.tools:  # the call reports it
                calls.append({"name": name, "arguments": {}})
                continue
            parameters = self.tools[name].parameters
            arguments: dict[str, Any] = {}
            for i, word in enumerate(words[1:]):
                key, eq, value = word.partition("=")
                if eq and key in parameters:
                    arguments[key] = _value(value)
                elif i < len(parameters):
                    arguments[parameters[i]] = _value(word)
                else:
                    raise ValueError(f"tool {name!r} takes {len(parameters)} argument(s), got {word!r} too")
            calls.append({"name": name, "arguments": arguments})
        return calls


def _value(word: str) -> Any:
    try:
        return json.loads(word)
    except json.JSONDecodeError:
        return word


def make_parser(spec: str | Callable, tools: Sequence[Tool], *, chat: bool) -> Callable[[str], list[ToolCall]]:
    """The parser ``tool_call_parser`` names, for ``tools``; ``chat``: the prompts are chat messages
    (``auto`` picks ``hermes`` then, ``compact`` otherwise)."""
    if callable(spec):
        return spec
    if spec == "auto":
        spec = "hermes" if chat else "compact"
    if spec == "hermes":
        return parse_hermes
    if spec == "compact":
        return CompactParser(tools)
    if isinstance(spec, str) and ":" in spec:
        module_name, _, attr = spec.rpartition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"tool_call_parser {spec!r}: cannot import module {module_name!r}: {e}") from None
        func = getattr(module, attr, None)
        if not callable(func):
            raise ValueError(f"tool_call_parser {spec!r}: {module_name!r} has no function {attr!r}")
        return func
    raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, 'module:function' or a callable; "
                     f"got {spec!r}")


# ----------------------------------------------------------------------------------------------------------
# calling


@dataclass(frozen=True)
class ToolResult:
    """What one call gave back, as the tool message's content."""

    name: str
    content: str
    """``str(result)``, or TRL's ``str({'error': message})`` when the call failed."""
    failed: bool
    """The call raised, timed out, named no tool, had bad arguments or could not be parsed."""


def failure(name: str, message: str) -> ToolResult:
    return ToolResult(name=name, content=str({"error": message}), failed=True)


def call_tool(call: ToolCall, tools: dict[str, Callable], timeout: float | None = None) -> ToolResult:
    """Run one parsed call with the tools of its episode (``{name: callable}``); an exception, an unknown name
    or, with ``timeout`` (seconds), a call still running then becomes a failed ``ToolResult``. A timed-out call
    cannot be stopped: its thread is left to finish in the background, its result unused."""
    name = call.get("name")
    if name not in tools:
        return failure(str(name), f"Tool {name} not found.")
    func, arguments = tools[name], call.get("arguments") or {}
    try:
        if inspect.iscoroutinefunction(func):
            result = asyncio.run(asyncio.wait_for(func(**arguments), timeout))
        elif timeout is None:
            result = func(**arguments)
        else:
            result = _call_with_timeout(func, arguments, timeout)
    except TimeoutError:
        return failure(name, f"Tool {name} timed out after {timeout:g} s.")
    except Exception as e:
        return failure(name, str(e) or type(e).__name__)
    return ToolResult(name=name, content=str(result), failed=False)


def _call_with_timeout(func: Callable, arguments: dict, timeout: float):
    out: dict[str, Any] = {}

    def run():
        try:
            out["result"] = func(**arguments)
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError
    if "error" in out:
        raise out["error"]
    return out["result"]
