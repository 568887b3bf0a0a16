"""The tokenizer of a Hugging Face-format model folder, read with `tokenizers` (not transformers) and jinja2."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from serving.errors import ChatTemplateError


class Tokenizer:
    """Encodes and decodes token ids and renders chat prompts for one model."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        """`add_bos_token` None leaves BOS to tokenizer.json's post-processor; True or False overrides it."""
        self._tok = tokenizer
        self._add_bos_token = add_bos_token
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self._token_id(bos_token)
        bos_id = self.bos_token_id
        self._post_processor_adds_bos = bos_id is not None and tokenizer.encode("").ids[:1] == [bos_id]
        self.eos_token_ids: frozenset[int] = frozenset(extra_eos_token_ids) | _present(self._token_id(eos_token))
        added_special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self.all_special_ids: frozenset[int] = frozenset(added_special) | self.eos_token_ids | _present(bos_id, self._token_id(pad_token))

    @classmethod
    def from_folder(cls, path: Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json (the last two optional)."""
        config = _read_json(path / "tokenizer_config.json")
        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        return cls(
            tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            add_bos_token=config.get("add_bos_token"),
            extra_eos_token_ids=[eos_ids] if isinstance(eos_ids, int) else eos_ids or (),
            chat_template=_chat_template(path, config),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, starts with one BOS exactly when add_bos_token says so."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens or self._add_bos_token is None or self.bos_token_id is None:
            return ids
        if self._post_processor_adds_bos and not self._add_bos_token:
            ids = ids[1:]
        if self._add_bos_token and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        tokens = []
        for i in ids:
            token = self._tok.id_to_token(i)
            if token is None:
                raise ValueError(f"token id {i} is outside the vocabulary")
            tokens.append(token)
        return tokens

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """Render `messages` into a prompt with the model's chat template (or `chat_template`), as transformers would;
        `tools` (OpenAI's function definitions) go to the template, which may describe them to the model."""
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError("the model folder has no chat template")
        try:
            return _compile(template).render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # a template is arbitrary code: any failure in it is a template error
            raise ChatTemplateError(f"rendering the chat template failed: {e}") from e

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


def _present(*ids: int | None) -> frozenset[int]:
    return frozenset(i for i in ids if i is not None)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """Newer transformers save the template to chat_template.jinja; older ones into the config, maybe by name."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}.get("default")
    return template


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    """Plain json.dumps: jinja2's own tojson escapes <, >, & and ' for HTML, which would change prompts."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """A sandboxed environment configured like transformers', so templates render the same."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
