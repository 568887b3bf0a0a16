"""OpenAI tool calling: parsers of model families' call syntaxes, grammars that force calls, streamed tool-call deltas."""
