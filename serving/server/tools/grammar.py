"""Lark grammars (llguidance's syntax) of tool calls in a parser's syntax, arguments valid against their schemas:
calls only (tool_choice required or a named function), or free text that, once a call opens, must go on as calls (auto)."""

from __future__ import annotations

import json
from typing import Any

from serving.server.openai_protocol import FunctionDefinition

# JSON on one line with ", " and ": " between items, as the chat templates write calls (and as constraints from
# response_format are written: serving/engine/structured.py says why whitespace is not left free)
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# a function declared without parameters takes none
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

# per syntax: the text around each call, the key of its arguments, and what separates calls
_SYNTAX: dict[str, tuple[str, str, str, str]] = {
    "hermes": ("<tool_call>\n", "\n</tool_call>", "arguments", "\n"),
    "smollm2": ("<tool_call>\n", "\n</tool_call>", "arguments", "\n"),
    "llama3_json": ("", "", "parameters", "; "),
}


def parameters_schema(function: FunctionDefinition) -> dict[str, Any]:
    return _NO_ARGUMENTS if function.parameters is None else function.parameters


def forced_calls_grammar(parser: str, functions: list[FunctionDefinition], max_calls: int) -> str:
    """A grammar whose sentences are 1 to `max_calls` calls, each of one of `functions`, in `parser`'s syntax."""
    return "\n".join([f"start: call {_more_calls(parser, max_calls)}".rstrip(), *_call_rules(parser, functions)])


def text_or_calls_grammar(parser: str, functions: list[FunctionDefinition], max_calls: int) -> str | None:
    """A grammar whose sentences are any text, or text up to a call's opening tag and then 1 to `max_calls` calls
    (nothing after them). None for a syntax whose calls have no opening tag in text (Llama's JSON)."""
    opening, closing, _, _ = _SYNTAX[parser]
    if not opening:
        return None
    first_call = f"({' | '.join(_names(functions))}) {_literal(closing)}"
    opening_pattern = opening.replace("\n", r"\n")  # the tags hold no other character special in a regex
    return "\n".join(
        [
            f"start: TEXT | text_then_opening {first_call} {_more_calls(parser, max_calls)}".rstrip(),
            "TEXT: /(?s:.*)/",
            # lazy: ends at the first opening tag, where the calls begin
            f"text_then_opening[lazy]: /(?s:.*){opening_pattern}/",
            *_call_rules(parser, functions),
        ]
    )


def _more_calls(parser: str, max_calls: int) -> str:
    separator = _SYNTAX[parser][3]
    return f"({_literal(separator)} call){{0,{max_calls - 1}}}" if max_calls > 1 else ""


def _call_rules(parser: str, functions: list[FunctionDefinition]) -> list[str]:
    opening, closing, key, _ = _SYNTAX[parser]
    names = _names(functions)
    call = f"call: {_literal(opening)} ({' | '.join(names)}) {_literal(closing)}" if opening else f"call: {' | '.join(names)}"
    return [call] + [f"{rule}: %json {json.dumps(_call_schema(f, key), ensure_ascii=False)}" for rule, f in zip(names, functions)]


def _names(functions: list[FunctionDefinition]) -> list[str]:
    return [f"fn_{i}" for i in range(len(functions))]


def _call_schema(function: FunctionDefinition, key: str) -> dict[str, Any]:
    """The JSON object of one call: the name, then the arguments. The arguments' $defs move to the root,
    where their "#/$defs/..." references point."""
    arguments = dict(parameters_schema(function))
    definitions = {name: arguments.pop(name) for name in ("$defs", "definitions") if name in arguments}
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, key: arguments},
        "required": ["name", key],
        "additionalProperties": False,
        "x-guidance": _COMPACT,
        **definitions,
    }


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal escapes as JSON does
