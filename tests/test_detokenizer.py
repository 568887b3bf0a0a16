"""Streaming detokenization checked against full decodes, on the tokenizers built in test_tokenizer.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_tokenizer import byte_level_json, make_tokenizer, sentencepiece_json

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.tokenizer import Tokenizer

FRAGMENTS = ["👨‍👩‍👧", "😀", "🎉", "🚀", "東京", "タワー", "中文", "日本語", "naïve", "café", "ß", "hello", "world", "42"]
SEPARATORS = [" ", " ", "", "\n", ", "]


@pytest.fixture
def byte_level(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path, byte_level_json(), {})


@pytest.fixture
def sentencepiece(tmp_path: Path) -> Tokenizer:
    return make_tokenizer(tmp_path, sentencepiece_json(), {"bos_token": "<s>", "add_bos_token": True})


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 12)))


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(i) for i in ids] + [detokenizer.finish()]


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_deltas_match_full_decode_at_every_complete_point(kind: str, request: pytest.FixtureRequest) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(kind)
    rng = random.Random(0)
    for _ in range(200):
        ids = tokenizer.encode(random_text(rng), add_special_tokens=False)
        detokenizer, text = IncrementalDetokenizer(tokenizer, []), ""
        for n, token_id in enumerate(ids, 1):
            delta = detokenizer.add(token_id)
            assert "\ufffd" not in delta
            text += delta
            full = tokenizer.decode(ids[:n])
            if not full.endswith("\ufffd"):
                assert text == full
        assert detokenizer.finish() == ""
        assert text == tokenizer.decode(ids)


def test_test_tokenizer_splits_characters_across_tokens(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("👨‍👩‍👧 東京タワー", add_special_tokens=False)
    assert sum("\ufffd" in byte_level.decode([i]) for i in ids) >= 4
    assert stream(IncrementalDetokenizer(byte_level, []), ids).count("") >= 2


def test_random_ids_with_invalid_utf8(byte_level: Tokenizer) -> None:
    """Arbitrary ids make invalid UTF-8; held-back replacement characters still come out, by the end."""
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randint(1, 20))]
        detokenizer, text = IncrementalDetokenizer(byte_level, []), ""
        for n, token_id in enumerate(ids, 1):
            text += detokenizer.add(token_id)
            full = byte_level.decode(ids[:n])
            assert full.startswith(text)
            if not full.endswith("\ufffd"):
                assert text == full
        text += detokenizer.finish()
        assert text == byte_level.decode(ids)


def test_unfinished_character_is_flushed_by_finish(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok 🦀", add_special_tokens=False)[:-1]
    deltas = stream(IncrementalDetokenizer(byte_level, []), ids)
    assert "\ufffd" not in "".join(deltas[:-1])
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == byte_level.decode(ids)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_prompt_context(kind: str, request: pytest.FixtureRequest) -> None:
    """Output text is what the output tokens add to the prompt's text."""
    tokenizer: Tokenizer = request.getfixturevalue(kind)
    rng = random.Random(2)
    for _ in range(100):
        prompt = tokenizer.encode(random_text(rng))
        output = tokenizer.encode(random_text(rng), add_special_tokens=False)
        deltas = stream(IncrementalDetokenizer(tokenizer, prompt), output)
        assert "\ufffd" not in "".join(deltas)
        prompt_text = tokenizer.decode(prompt)
        assert prompt_text + "".join(deltas) == tokenizer.decode(prompt + output)


def test_sentencepiece_leading_space_needs_prompt_context(sentencepiece: Tokenizer) -> None:
    prompt = sentencepiece.encode("The capital of Japan is")
    output = sentencepiece.encode("東京 indeed", add_special_tokens=False)
    assert sentencepiece.convert_ids_to_tokens(output)[0].startswith("▁")
    assert "".join(stream(IncrementalDetokenizer(sentencepiece, prompt), output)) == " 東京 indeed"
    assert "".join(stream(IncrementalDetokenizer(sentencepiece, []), output)) == "東京 indeed"


def test_prompt_ending_inside_a_character(byte_level: Tokenizer) -> None:
    prompt = byte_level.encode("say 🎉", add_special_tokens=False)[:-1]
    output = byte_level.encode(" ok", add_special_tokens=False)
    assert "".join(stream(IncrementalDetokenizer(byte_level, prompt), output)) == " ok"


@pytest.mark.parametrize(("skip", "expected"), [(True, "hello world"), (False, "hello<|im_end|> world<|endoftext|>")])
def test_skip_special_tokens(byte_level: Tokenizer, skip: bool, expected: str) -> None:
    ids = byte_level.encode("hello<|im_end|> world<|endoftext|>", add_special_tokens=False)
    prompt = byte_level.encode("<|im_start|>assistant\n")
    deltas = stream(IncrementalDetokenizer(byte_level, prompt, skip_special_tokens=skip), ids)
    assert "".join(deltas) == expected == byte_level.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_each_step_decodes_a_short_window(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(kind)
    prompt = tokenizer.encode("Hi")
    ids = tokenizer.encode(random_text(random.Random(3)) * 100, add_special_tokens=False)
    expected = tokenizer.decode(prompt + ids)
    window_lengths: list[int] = []
    full_decode = tokenizer.decode

    def decode(window: list[int], skip_special_tokens: bool = True) -> str:
        window_lengths.append(len(window))
        return full_decode(window, skip_special_tokens)

    monkeypatch.setattr(tokenizer, "decode", decode)
    assert "Hi" + "".join(stream(IncrementalDetokenizer(tokenizer, prompt), ids)) == expected
    assert len(ids) > 500 and max(window_lengths) <= 12
