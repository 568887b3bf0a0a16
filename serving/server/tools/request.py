"""A chat request's tools: checked, offered to the chat template, and enforced when tool_choice says a call must come."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import llguidance

from serving.config import LimitsConfig
from serving.engine.sampling_params import OutputConstraint
from serving.server.http_errors import bad_request
from serving.server.openai_protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from serving.server.tools.grammar import forced_calls_grammar, parameters_schema, text_or_calls_grammar
from serving.server.tools.parsers import PARSERS
from serving.server.tools.stream import ToolCalling

# parsers whose syntax the model's own template does not teach: the package ships a template that does
_TEMPLATES = {"smollm2": "smollm2_tools.jinja"}


@dataclass
class ToolPlan:
    calling: ToolCalling | None  # reads calls out of the output; None: the output is all content
    tools: list[dict[str, Any]] | None  # offered to the chat template
    constraint: OutputConstraint | None  # the grammar of the calls (with "auto": of text, or text and then calls)
    forced: bool  # tool_choice demands calls; with "auto" another output constraint of the request wins over the calls'
    skip_special_tokens: bool | None  # set when the parser needs to see a special token (Llama's <|python_tag|>)


def plan_tools(request: ChatCompletionRequest, parser: str, limits: LimitsConfig) -> ToolPlan:
    """What the request's tools fields ask of this model's `parser` ("none": the model has none); 400s for what cannot be."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan(None, None, None, False, None)
    names = [tool.function.name for tool in request.tools]
    if len(set(names)) < len(names):
        raise bad_request("tools must have different names", "tools")
    for tool in request.tools:
        _check_schema(tool.function.name, parameters_schema(tool.function))
    if choice == "none":
        return ToolPlan(None, None, None, False, None)
    if parser == "none":
        raise bad_request("this server has no tool parser for its model (set model.tool_parser); send tool_choice 'none'", "tools")
    functions = [tool.function for tool in request.tools]
    if isinstance(choice, NamedToolChoice):
        functions = [f for f in functions if f.name == choice.function.name]
        if not functions:
            raise bad_request(f"tool_choice names '{choice.function.name}', which is not among the tools", "tool_choice")
    parallel = request.parallel_tool_calls is not False
    max_calls = limits.max_tool_calls if parallel else 1
    forced = choice not in (None, "auto")
    grammar = forced_calls_grammar(parser, functions, max_calls) if forced else text_or_calls_grammar(parser, functions, max_calls)
    constraint = None if grammar is None else OutputConstraint("grammar", grammar)
    offered = [tool.model_dump(exclude_none=True) for tool in request.tools]
    keep_special = False if parser == "llama3_json" and request.skip_special_tokens is None else None
    return ToolPlan(ToolCalling(PARSERS[parser](), parallel), offered, constraint, forced, keep_special)


def _check_schema(name: str, schema: dict[str, Any]) -> None:
    problem = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    if problem:
        raise bad_request(f"the parameters of tool '{name}' are not a JSON schema this server takes: {problem}", "tools")
    if schema.get("type", "object") != "object":
        raise bad_request(f"the parameters of tool '{name}' must describe an object", "tools")


@cache
def tool_template(parser: str) -> str | None:
    """The chat template the package ships for `parser`, if the model's own does not render tools (read once)."""
    name = _TEMPLATES.get(parser)
    return None if name is None else files("serving.server.tools").joinpath("templates", name).read_text(encoding="utf-8")


def request_template(parser: str, offered: list[dict[str, Any]] | None, messages: list[ChatMessage]) -> str | None:
    """The template to render a request with: the one shipped for `parser` when the request involves tools (offered,
    or calls and results in the conversation), else None (the model's own, so that a model whose template the
    shipped one replaces keeps its own prompt for plain chat)."""
    involves_tools = offered is not None or any(m.role == "tool" or m.tool_calls for m in messages)
    return tool_template(parser) if involves_tools else None


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: developer as system, tool calls' arguments as objects."""
    turns = []
    for m in messages:
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            turn["name"] = m.name
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls
            ]
        turns.append(turn)
    return turns


def _arguments(text: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise bad_request("a tool call's arguments must be a JSON object written as text", "messages")
    return arguments
