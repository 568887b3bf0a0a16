"""Tokenizer tests on small tokenizers trained here, so nothing depends on a model download.

test_detokenizer.py builds its tokenizers with the functions here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from serving.errors import ChatTemplateError
from serving.tokenizer import Tokenizer

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog. A naïve café serves crème brûlée.",
    "東京タワーは東京にあります。日本語のテキストと中文字符 mixed with English words.",
    "Emoji: 😀 😃 🎉 👨‍👩‍👧 family, 👍 thumbs up, 🚀 rocket. Numbers 12345 and symbols #@!",
] * 4
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = """{% for message in messages %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim %}
    {% if loop.first %}
        {% set content = bos_token + content %}
    {% endif %}
{{ content + '<|eot_id|>' }}
{%- endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi 👋 "}]


@lru_cache
def byte_level_json() -> str:
    """A GPT-2-style byte-level BPE whose 400 tokens split many emoji and CJK characters between tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, special_tokens=special, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


@lru_cache
def sentencepiece_json() -> str:
    """A Llama-2-style tokenizer: Metaspace pieces trained without emoji, byte fallback, a post-processor adding <s>."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS[:2], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def make_tokenizer(
    folder: Path,
    tokenizer_json: str,
    config: dict[str, Any],
    generation_config: dict[str, Any] | None = None,
) -> Tokenizer:
    """Write a Hugging Face-format folder and load it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    return Tokenizer.from_folder(folder)


@pytest.fixture
def byte_level(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path, byte_level_json(), {"eos_token": "<|im_end|>", "chat_template": CHATML})


@pytest.fixture
def sentencepiece(tmp_path: Path) -> Tokenizer:
    bos = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return make_tokenizer(tmp_path, sentencepiece_json(), {"bos_token": bos, "eos_token": "</s>", "add_bos_token": True})


@pytest.mark.parametrize("text", ["👨‍👩‍👧 family", "東京タワー", "naïve café", "mixed 😀🚀 中文 and ß\nlines"])
@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_roundtrip(kind: str, text: str, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(kind)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert "".join(tokenizer.convert_ids_to_tokens(ids)) != ""


def test_emoji_outside_sentencepiece_vocab_uses_byte_tokens(sentencepiece: Tokenizer) -> None:
    tokens = sentencepiece.convert_ids_to_tokens(sentencepiece.encode("🚀", add_special_tokens=False))
    assert tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]


def test_convert_ids_to_tokens_rejects_unknown_id(byte_level: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        byte_level.convert_ids_to_tokens([0, byte_level.vocab_size])


@pytest.mark.parametrize(
    ("tokenizer_json", "add_bos_token", "text", "bos_count"),
    [
        (byte_level_json, True, "hi", 1),  # prepended explicitly
        (byte_level_json, True, "<|endoftext|>hi", 1),  # already there: no second BOS
        (byte_level_json, None, "hi", 0),
        (byte_level_json, False, "hi", 0),
        (sentencepiece_json, True, "hi", 1),  # the post-processor adds it: no second BOS
        (sentencepiece_json, None, "hi", 1),  # left to the post-processor
        (sentencepiece_json, False, "hi", 0),  # the config turns off the post-processor's BOS
        (sentencepiece_json, False, "<s>hi", 1),  # a BOS written in the text stays
    ],
)
def test_bos_follows_add_bos_token(tmp_path: Path, tokenizer_json: Any, add_bos_token: bool | None, text: str, bos_count: int) -> None:
    bos = "<|endoftext|>" if tokenizer_json is byte_level_json else "<s>"
    config = {"bos_token": bos} if add_bos_token is None else {"bos_token": bos, "add_bos_token": add_bos_token}
    tokenizer = make_tokenizer(tmp_path, tokenizer_json(), config)
    ids = tokenizer.encode(text)
    assert ids[:bos_count] == [tokenizer.bos_token_id] * bos_count
    assert ids[bos_count] != tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer.encode("hi", add_special_tokens=False)


def test_no_bos_token(byte_level: Tokenizer) -> None:
    assert byte_level.bos_token_id is None
    assert byte_level.decode(byte_level.encode("hi")) == "hi"


@pytest.mark.parametrize(("generation_eos", "extra"), [(None, set()), (1, {1}), ([0, 1], {0, 1})])
def test_eos_token_ids_unite_both_configs(tmp_path: Path, generation_eos: Any, extra: set[int]) -> None:
    generation_config = None if generation_eos is None else {"eos_token_id": generation_eos}
    tokenizer = make_tokenizer(tmp_path, byte_level_json(), {"eos_token": "<|im_end|>"}, generation_config)
    assert tokenizer.eos_token_ids == {2} | extra
    assert tokenizer.all_special_ids == {0, 1, 2}


def test_chatml_template(byte_level: Tokenizer) -> None:
    assert byte_level.apply_chat_template(MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi 👋 <|im_end|>\n<|im_start|>assistant\n"
    )
    assert byte_level.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("👋 <|im_end|>\n")


def test_llama3_template_with_bos_and_block_trimming(tmp_path: Path) -> None:
    config = {"bos_token": "<|begin_of_text|>", "chat_template": LLAMA3}
    tokenizer = make_tokenizer(tmp_path, byte_level_json(), config)
    assert tokenizer.apply_chat_template(MESSAGES) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi 👋<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize(
    ("config", "jinja_file"),
    [
        ({"chat_template": [{"name": "tool_use", "template": "no"}, {"name": "default", "template": "{{ 'yes' }}"}]}, None),
        ({"chat_template": "no"}, "{{ 'yes' }}"),
    ],
)
def test_template_sources(tmp_path: Path, config: dict[str, Any], jinja_file: str | None) -> None:
    if jinja_file is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
    assert make_tokenizer(tmp_path, byte_level_json(), config).apply_chat_template(MESSAGES) == "yes"


def test_tojson_does_not_escape_html_and_strftime_now_exists(tmp_path: Path) -> None:
    template = "{{ messages[0] | tojson }}{% if strftime_now is defined %}!{% endif %}"
    tokenizer = make_tokenizer(tmp_path, byte_level_json(), {"chat_template": template})
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "<b>é</b> & 'x'"}])
    assert rendered == '{"role": "user", "content": "<b>é</b> & \'x\'"}!'


def test_missing_template(sentencepiece: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        sentencepiece.apply_chat_template(MESSAGES)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}", "rendering the chat template failed"),  # syntax error
        ("{{ messages.append({}) }}", "rendering the chat template failed"),  # the sandbox is immutable
        ("{{ ''.__class__.__mro__ }}", "rendering the chat template failed"),  # no dunder access
        ("{{ messages[0]['content'] + 1 }}", "rendering the chat template failed"),
    ],
)
def test_template_errors(tmp_path: Path, template: str, message: str) -> None:
    tokenizer = make_tokenizer(tmp_path, byte_level_json(), {"chat_template": template})
    with pytest.raises(ChatTemplateError, match=message):
        tokenizer.apply_chat_template(MESSAGES)
