"""The output constraint of a request: from OpenAI's response_format, vLLM's structured_outputs or its guided_* fields.

A request may use one of these fields, and one constraint in it. The engine compiles the
constraint and refuses one that does not compile; the size limit is checked here, before any work.
"""

from __future__ import annotations

import json
from typing import Any

from serving.config import LimitsConfig
from serving.engine.sampling_params import ConstraintKind, OutputConstraint
from serving.server.http_errors import bad_request
from serving.server.openai_protocol import ChatCompletionRequest, SamplingRequest

_ANY_OBJECT = '{"type":"object"}'


def request_constraint(
    request: SamplingRequest, limits: LimitsConfig, tool_calls: OutputConstraint | None = None, calls_forced: bool = False
) -> tuple[OutputConstraint | None, str | None]:
    """The request's constraint and the field that carried it (which errors about it name). `tool_calls` is the
    grammar of the request's tool calls, a constraint the tools field carries: when tool_choice forces calls it
    counts as one more, otherwise it applies only if the request has no other."""
    found = _constraints(request)
    if tool_calls is not None and (calls_forced or not found):
        found.append(("tools", tool_calls))
    if len(found) > 1:
        raise bad_request(f"give at most one output constraint, not {' and '.join(field for field, _ in found)}", found[1][0])
    if not found:
        return None, None
    field, constraint = found[0]
    try:
        size = len(constraint.spec.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad_request("the constraint holds a lone surrogate (\\ud800-\\udfff), which is not text", field) from None
    if size > limits.max_grammar_bytes:
        raise bad_request(f"the constraint is {size} bytes; this server takes at most {limits.max_grammar_bytes}", field)
    return constraint, field


def _constraints(request: SamplingRequest) -> list[tuple[str, OutputConstraint]]:
    found: list[tuple[str, OutputConstraint]] = []
    if isinstance(request, ChatCompletionRequest) and (fmt := request.response_format) is not None and fmt.type != "text":
        if fmt.type == "json_object":
            found.append(("response_format", OutputConstraint("json", _ANY_OBJECT)))
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema", "response_format")
        else:
            found.append(("response_format", OutputConstraint("json", _schema_text(fmt.json_schema.schema_))))
    if (outputs := request.structured_outputs) is not None:
        given = [
            (name, kind, value)
            for name, kind, value in (
                ("json", "json", outputs.json_),
                ("regex", "regex", outputs.regex),
                ("choice", "choice", outputs.choice),
                ("grammar", "grammar", outputs.grammar),
                ("json_object", "json", outputs.json_object or None),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar and json_object", "structured_outputs")
        name, kind, value = given[0]
        found.append(("structured_outputs", _constraint(kind, _ANY_OBJECT if name == "json_object" else value)))
    legacy: tuple[tuple[str, ConstraintKind, Any], ...] = (
        ("guided_json", "json", request.guided_json),
        ("guided_regex", "regex", request.guided_regex),
        ("guided_choice", "choice", request.guided_choice),
        ("guided_grammar", "grammar", request.guided_grammar),
    )
    found += [(field, _constraint(kind, value)) for field, kind, value in legacy if value is not None]
    return found


def _constraint(kind: ConstraintKind, value: Any) -> OutputConstraint:
    if kind == "json":
        return OutputConstraint("json", value if isinstance(value, str) else _schema_text(value))
    if kind == "choice":
        return OutputConstraint("choice", json.dumps(value, ensure_ascii=False))
    return OutputConstraint(kind, value)


def _schema_text(schema: dict[str, Any]) -> str:
    """Compact JSON in the schema's own key order (properties are generated in that order)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
