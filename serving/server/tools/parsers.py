"""Tool-call syntaxes of model families: where a model's output holds calls, read while it streams or once whole.

A parser scans the output text so far into a `Scan`: the content outside calls that is safe to send
(no suffix that may still become a call's opening), and the calls begun so far, each with its name
once that is known and its arguments' JSON text so far. Each scan of a longer text extends the
previous one, so a stream can send the difference; the whole output scanned with `final` is what a
non-streamed response holds. Arguments are the model's own JSON text, cut from the output.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

# a call object that names its function first: {"name": "...", "arguments"|"parameters": <value>
_NAMED_FIRST = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_CALL_CLOSE = re.compile(r"\s*\}")


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str  # JSON text of the arguments so far; the whole object once `complete`
    complete: bool = False


@dataclass
class Scan:
    content: str  # text outside calls that may be sent
    calls: list[PartialCall] = field(default_factory=list)
    malformed: bool = False  # a call is not valid JSON of the syntax (or, when final, not finished)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


class ToolParser(ABC):
    """One model family's way of writing tool calls in its output."""

    @abstractmethod
    def scan(self, text: str, final: bool) -> Scan:
        """What `text` holds so far; with `final`, the text is the whole output."""

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The content (None when empty) and the calls of a whole output; an output with a malformed call is all content."""
        scan = self.scan(text, final=True)
        if scan.malformed or not all(c.complete and c.name is not None for c in scan.calls):
            return text or None, []
        calls = [ParsedCall(c.name, c.arguments) for c in scan.calls if c.name is not None]
        return (scan.content if scan.content.strip() else None), calls


class HermesParser(ToolParser):
    """Calls in `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen2.5, Hermes); text around them is content."""

    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def scan(self, text: str, final: bool) -> Scan:
        content: list[str] = []
        calls: list[PartialCall] = []
        position = 0
        while True:
            start = text.find(self.open_tag, position)
            if start < 0:
                tail = text[position:]
                content.append(tail if final else _without_opening(tail, self.open_tag))
                break
            content.append(text[position:start])
            body_start = start + len(self.open_tag)
            end = text.find(self.close_tag, body_start)
            body = text[body_start:] if end < 0 else text[body_start:end]
            call, malformed = _scan_call(body.strip() if end >= 0 or final else body.lstrip(), final or end >= 0)
            if call is not None:
                calls.append(call)
            if malformed:
                return Scan("".join(content), calls, malformed=True)
            if end < 0:
                break
            position = end + len(self.close_tag)
        return Scan("".join(content), calls)


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2's JSON calls: `{"name": ..., "parameters": {...}}` as the whole output, or after `<|python_tag|>`
    (text before the tag is content); several calls are separated by `;`."""

    tag = "<|python_tag|>"

    def scan(self, text: str, final: bool) -> Scan:
        tagged = text.find(self.tag)
        if tagged >= 0:
            content, calls_text = text[:tagged], text[tagged + len(self.tag) :]
        elif text.lstrip().startswith("{"):
            content, calls_text = "", text
        elif not text.strip():
            return Scan(text if final else "")  # nothing yet says whether calls or text follow
        else:
            return Scan(text if final else _without_opening(text, self.tag))
        calls: list[PartialCall] = []
        rest = calls_text.lstrip()
        while rest:
            end = _json_end(rest)
            call, malformed = _scan_call(rest if end is None else rest[:end], final or end is not None)
            if call is not None:
                calls.append(call)
            if malformed or end is None:
                return Scan(content, calls, malformed)
            rest = rest[end:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return Scan(content, calls, malformed=True)
        return Scan(content, calls, malformed=final and not calls)


def _scan_call(body: str, whole: bool) -> tuple[PartialCall | None, bool]:
    """The call written in `body` (JSON of a call object, whole or begun) and whether it is malformed."""
    if not body:
        return None, whole
    if (head := _NAMED_FIRST.match(body)) is not None and (name := _string(head.group(1))) is not None:
        value = body[head.end() :]
        if not value or value[0] != "{":
            return None, bool(value)
        end = _json_end(value)
        if end is None:
            return PartialCall(name, value), whole
        after = value[end:]
        if not after.strip() and not whole:
            return PartialCall(name, value[:end]), False
        close = _CALL_CLOSE.match(after)
        if close is not None and not after[close.end() :].strip():
            return PartialCall(name, value[:end], complete=_is_json(value[:end])), False
    if not whole:
        return None, False  # another key order: read it once the object is whole
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None, True
    arguments = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
    if not isinstance(obj.get("name") if isinstance(obj, dict) else None, str) or not isinstance(arguments, dict):
        return None, True
    return PartialCall(obj["name"], json.dumps(arguments, ensure_ascii=False), complete=True), False


def _json_end(text: str) -> int | None:
    """Where the JSON object or array at the start of `text` ends (None while it is unfinished)."""
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _string(escaped: str) -> str | None:
    """The text of a JSON string's body (None if its escapes are not JSON's)."""
    try:
        return json.loads(f'"{escaped}"')
    except json.JSONDecodeError:
        return None


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _without_opening(text: str, opening: str) -> str:
    """`text` less a suffix that may be the beginning of `opening`."""
    for size in range(min(len(opening) - 1, len(text)), 0, -1):
        if opening.startswith(text[-size:]):
            return text[:-size]
    return text


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "smollm2": HermesParser}


def resolve_parser(setting: str, chat_template: str | None) -> str:
    """The parser a served model uses: `setting` (model.tool_parser), or with "auto" the one its chat template
    teaches: Hermes blocks, Llama 3.1/3.2 JSON, or for a ChatML template that ignores tools (SmolLM2's) the
    Hermes syntax with the template this package ships; "none" when nothing fits."""
    if setting != "auto":
        return setting
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "Environment: ipython" in template:
        return "llama3_json"
    if "<|im_start|>" in template and "tools" not in template:
        return "smollm2"
    return "none"
