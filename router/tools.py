"""Tool calling, the request's side: `tools`, `tool_choice` and `parallel_tool_calls` checked and
turned into a plan: what the chat template gets, what constrains the output, what parses it.

    tool_choice   template gets tools   output constrained by            parsed by
    none          no                    (response_format, if any)        nothing: plain content
    auto          yes                   nothing                          --tool-call-parser
    required      yes                   a JSON array of {name, parameters},  tool_parsers.required_calls
                                        each one tool's schema (anyOf)
    {function}    yes                   that tool's parameters schema    tool_parsers.named_call

required and a named function therefore always give calls whose arguments parse and validate,
whatever the model; auto depends on the model writing its own format.

A function's `strict` (router/structured_outputs.json_schema): left out or true, every keyword of
its parameters is enforced (one the engine cannot enforce is a 400 naming tools); false, such a
keyword is skipped and the rest still enforced. Under auto nothing constrains the calls, so
`strict` changes nothing there (as in vLLM, whose docs say it ignores the field); a client that
needs valid arguments asks for required or a named function.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.router.errors import invalid_request
from pagedserve.router.structured_outputs import Constraint, json_schema, strict_flag
from pagedserve.router.tool_parsers import (
    KEEPS_SPECIAL_TOKENS,
    PARSERS,
    Parsed,
    named_call,
    required_calls,
)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None  # given to the chat template
    constraint: Constraint | None  # required / named: the grammar of the calls
    parse: Callable[[str, bool], Parsed] | None  # None: the output is plain content
    max_calls: int | None  # parallel_tool_calls false: 1
    keep_special_tokens: bool  # the parser's markers are special tokens


NO_TOOLS = ToolPlan(None, None, None, None, False)


def _check_tools(tools: Any) -> dict[str, dict[str, Any]]:
    """name -> function of each tool; 400 naming tools for a malformed one."""
    if not isinstance(tools, list):
        raise invalid_request("tools must be a list of function tools", "tools")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn,
                                                                                          dict):
            raise invalid_request(f"{where} must be {{'type': 'function', 'function': {{...}}}}",
                                  "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid_request(f"{where}.function.name must be 1-64 letters, digits, _ . or -",
                                  "tools")
        if name in functions:
            raise invalid_request(f"{where}.function.name {name!r} is given twice", "tools")
        if not isinstance(fn.get("parameters", ANY_OBJECT), dict):
            raise invalid_request(f"{where}.function.parameters must be a JSON schema object",
                                  "tools")
        if not isinstance(fn.get("description", ""), str):
            raise invalid_request(f"{where}.function.description must be a string", "tools")
        strict_flag(fn.get("strict"), "tools")
        functions[name] = fn
    return functions


def _choice(tool_choice: Any, functions: dict[str, dict[str, Any]]) -> str:
    """'none', 'auto', 'required' or the named function's name."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise invalid_request("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        if tool_choice != "none" and not functions:
            raise invalid_request(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" \
            or not isinstance(name, str) or not name:
        raise invalid_request("tool_choice must name a function as {'type': 'function', "
                              "'function': {'name': ...}}", "tool_choice")
    if name not in functions:
        raise invalid_request(f"tool_choice names {name!r}, which is not among tools",
                              "tool_choice")
    return name


def _required_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"const": name},
                             "parameters": fn.get("parameters", ANY_OBJECT)}}
             for name, fn in functions.items()]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    return {**schema, "maxItems": 1} if not parallel else schema


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool,
               parser: str | None, output_constraint: Constraint | None) -> ToolPlan:
    """The plan for a chat request's tool fields; 400 naming the field at fault."""
    if tools is None and tool_choice in (None, "none"):
        return NO_TOOLS
    functions = _check_tools(tools if tools is not None else [])
    choice = _choice(tool_choice, functions)
    if choice == "none":
        return NO_TOOLS
    if output_constraint is not None:
        raise invalid_request(f"{output_constraint.param} constrains the output, so tools cannot "
                              f"be called; give tool_choice 'none' or drop it",
                              output_constraint.param)
    template_tools = [{"type": "function", "function": fn} for fn in functions.values()]
    max_calls = None if parallel_tool_calls else 1
    if choice == "auto":
        if parser is None:
            raise invalid_request("tool_choice 'auto' needs a server started with "
                                  "--tool-call-parser", "tool_choice")
        return ToolPlan(template_tools, None, PARSERS[parser], max_calls,
                        parser in KEEPS_SPECIAL_TOKENS)
    if choice == "required":
        # one grammar for all the tools, so one strictness: lenient only when no tool is strict
        strict = any(strict_flag(fn.get("strict"), "tools") for fn in functions.values())
        constraint = json_schema(_required_schema(functions, parallel_tool_calls), "tools",
                                 strict)
        return ToolPlan(template_tools, constraint, required_calls, max_calls, False)
    fn = functions[choice]
    constraint = json_schema(fn.get("parameters", ANY_OBJECT), "tools",
                             strict_flag(fn.get("strict"), "tools"))
    return ToolPlan(template_tools, constraint, named_call(choice), 1, False)


def template_only(tools: Any) -> ToolPlan:
    """The tools checked and given to the chat template, the output neither constrained nor
    parsed (the offline LLM.chat with tools but no tool_choice or parser, as vLLM's)."""
    functions = _check_tools(tools)
    return ToolPlan([{"type": "function", "function": fn} for fn in functions.values()],
                    None, None, None, False)


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message as templates expect it: an assistant's tool call arguments as an object
    (Hugging Face templates write them with tojson; OpenAI sends them as a JSON string)."""
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not isinstance(calls, list):
        return message
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            with contextlib.suppress(ValueError):  # not JSON: the template gets the string
                fn = {**fn, "arguments": json.loads(fn["arguments"])}
            call = {**call, "function": fn}
        out.append(call)
    return {**message, "tool_calls": out}
