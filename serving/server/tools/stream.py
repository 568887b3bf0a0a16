"""Tool calls in chat responses: a whole message's `tool_calls`, or OpenAI's `delta.tool_calls` chunk by chunk."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.server.tools.parsers import ToolParser


@dataclass
class ToolCalling:
    """How a request's output is read for calls: the model family's parser; without `parallel`, only the first call counts."""

    parser: ToolParser
    parallel: bool

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole output, and its finish reason ("tool_calls" when it ended after calls)."""
        content, calls = self.parser.parse(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        calls = calls if self.parallel else calls[:1]
        tool_calls = [{"id": _call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return {"role": "assistant", "content": content, "tool_calls": tool_calls}, _finish(finish_reason)

    def stream(self) -> ToolStream:
        return ToolStream(self)


@dataclass
class _SentCall:
    arguments: str = ""


@dataclass
class ToolStream:
    """One choice's stream: text deltas in, chunk deltas out. Content is sent once it is known not to begin a call
    (whitespace waits for text after it); a call's first delta carries its id and name, the next ones its arguments."""

    calling: ToolCalling
    text: str = ""
    content_sent: str = ""
    calls_sent: list[_SentCall] = field(default_factory=list)

    def feed(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The chunk delta for `text`, the next piece of output, and the chunk's finish reason."""
        self.text += text
        final = finish_reason is not None
        scan = self.calling.parser.scan(self.text, final)
        delta: dict[str, Any] = {}
        content = scan.content if scan.content.strip() else ""
        if final and not self.calls_sent and not self.calling.parser.parse(self.text)[1]:
            content = self.text  # no call after all: the whole output is content, as in a whole message
        if content.startswith(self.content_sent) and len(content) > len(self.content_sent):
            delta["content"] = content[len(self.content_sent) :]
            self.content_sent = content
        calls = [c for c in scan.calls if c.name is not None]
        tool_calls = []
        for index, call in enumerate(calls if self.calling.parallel else calls[:1]):
            if index == len(self.calls_sent):
                self.calls_sent.append(_SentCall())
                function = {"name": call.name, "arguments": ""}
                tool_calls.append({"index": index, "id": _call_id(), "type": "function", "function": function})
            sent = self.calls_sent[index]
            if call.arguments.startswith(sent.arguments) and len(call.arguments) > len(sent.arguments):
                piece = call.arguments[len(sent.arguments) :]
                sent.arguments = call.arguments
                if tool_calls and tool_calls[-1]["index"] == index:
                    tool_calls[-1]["function"]["arguments"] += piece
                else:
                    tool_calls.append({"index": index, "function": {"arguments": piece}})
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return delta, _finish(finish_reason) if self.calls_sent else finish_reason


def _finish(reason: str | None) -> str | None:
    """A choice that ended on its own after tool calls ended for them; one cut by max_tokens says so."""
    return "tool_calls" if reason == "stop" else reason


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
