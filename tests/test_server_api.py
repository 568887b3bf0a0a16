"""End to end: the real Ray Serve application with the default model, driven by the official openai client.

One application serves the whole module (start-up is the slow part); traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import jsonschema
import pytest
import ray
import requests
from openai import OpenAI
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from serve_app import served

from serving.config import LLMConfig
from serving.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
MAX_ONGOING, MAX_QUEUED = 8, 4


@pytest.fixture(scope="module")
def server(default_model) -> Iterator[str]:
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(default_model), "max_model_len": MAX_MODEL_LEN},
            "engine": {"kv_cache_memory_gb": 0.25, "max_num_seqs": 16},
            "server": {"port": free_port(), "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED},
        }
    )
    with served(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def engine_state(server: str) -> dict[str, float]:
    """The engine gauges of /metrics, by metric name."""
    text = requests.get(f"{server}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if "replica" in s.labels}


def wait_until_idle(server: str, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = engine_state(server)
        idle = state["llmcluster_requests_running"] == 0 and state["llmcluster_kv_cache_usage_ratio"] == 0
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


# what works


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_default_model_knows_the_capital_of_france(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=32
    )
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    usage = response.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_equals_non_stream_and_ends_with_usage(client):
    args = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}],
        "temperature": 0,
        "max_completion_tokens": 20,
    }
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_n2_with_stop(client):
    response = client.completions.create(
        model=MODEL, prompt="Here is a list of fruits: apple,", n=2, temperature=0.8, seed=3, max_tokens=24, stop=[","]
    )
    assert sorted(c.index for c in response.choices) == [0, 1]
    for choice in response.choices:
        assert "," not in choice.text
        assert choice.finish_reason in ("stop", "length")
    assert any(c.finish_reason == "stop" for c in response.choices)
    assert response.usage.completion_tokens <= 2 * 24


def test_completion_stream_n2_equals_non_stream(client):
    args = {"model": MODEL, "prompt": "Once upon a time", "n": 2, "temperature": 1.0, "seed": 11, "max_tokens": 12}
    whole = client.completions.create(**args)
    texts = {0: "", 1: ""}
    finish = {}
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage == whole.usage


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        args = {"model": MODEL, "prompt": "My favourite animal is", "temperature": 1.0, "max_tokens": 24, "seed": seed}
        return client.completions.create(**args).choices[0].text

    assert sample(42) == sample(42)
    assert sample(42) != sample(43)


def test_completion_logprobs_with_echo(client):
    prompt = "The sky is"
    response = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    choice = response.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    num_tokens = response.usage.prompt_tokens + response.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == num_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    for token, logprob, top in zip(lp.tokens[-3:], lp.token_logprobs[-3:], lp.top_logprobs[-3:]):
        assert top[token] == pytest.approx(logprob)  # greedy: the chosen token is the most likely one


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], logprobs=True, top_logprobs=3, max_tokens=5, temperature=0
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_batched_and_token_id_prompts(client, default_model):
    one = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    batch = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == one.choices[0].text
    hello = Tokenizer.from_folder(default_model).encode("Hello")
    by_ids = client.completions.create(model=MODEL, prompt=[hello, hello], max_tokens=4, temperature=0, echo=True)
    assert [c.text for c in by_ids.choices] == ["Hello" + one.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * len(hello)


# the fields OpenAI clients and vLLM-targeting tools send (docs/api.md)


@pytest.fixture(scope="module")
def tokenizer(default_model) -> Tokenizer:
    return Tokenizer.from_folder(default_model)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client, endpoint):
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    args = {"model": MODEL, "temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    args |= {"prompt": "Once upon a time"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    whole = create(**args)
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None and c.usage.prompt_tokens == whole.usage.prompt_tokens for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 8 and chunks[-1].usage == whole.usage and chunks[-1].choices == []
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    assert len(set(counts)) > 2  # counts grow chunk by chunk, not only at the end


def test_logit_bias_steers_the_tokens(client, tokenizer):
    [paris] = tokenizer.encode(" Paris")
    response = client.completions.create(model=MODEL, prompt="I like", max_tokens=3, temperature=0, logit_bias={str(paris): 100})
    assert response.choices[0].text == " Paris" * 3
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=3, temperature=0.7, seed=1, logit_bias={str(paris): 100}
    )
    assert chat.choices[0].message.content == " Paris" * 3


def test_min_tokens_keeps_a_short_answer_going(client):
    messages = [{"role": "user", "content": "Reply with one word: yes or no?"}]
    args = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 40}
    short = client.chat.completions.create(**args)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 25
    held = client.chat.completions.create(**args, extra_body={"min_tokens": 25})
    assert held.usage.completion_tokens >= 25


def test_stop_token_ids_and_include_stop_str_in_output(client, tokenizer):
    args = {"model": MODEL, "prompt": "Here is a list of fruits: apple,", "temperature": 0, "max_tokens": 12}
    free = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    [comma] = tokenizer.encode(",")
    assert "," in free
    cut = client.completions.create(**args, extra_body={"stop_token_ids": [comma]}).choices[0]
    assert (cut.text, cut.finish_reason) == (free[: free.index(",")], "stop")
    kept = client.completions.create(**args, extra_body={"stop_token_ids": [comma], "include_stop_str_in_output": True})
    assert kept.choices[0].text == free[: free.index(",") + 1]
    with_stop = client.completions.create(**args, stop=[","], extra_body={"include_stop_str_in_output": True})
    assert with_stop.choices[0].text == free[: free.index(",") + 1]


def test_skip_special_tokens_false_keeps_them_in_the_text(client, tokenizer):
    start = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    assert len(start) == 1 and start[0] in tokenizer.all_special_ids and start[0] not in tokenizer.eos_token_ids
    args = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "logit_bias": {str(start[0]): 100}}
    assert client.completions.create(**args).choices[0].text == ""
    kept = client.completions.create(**args, extra_body={"skip_special_tokens": False}).choices[0].text
    assert kept == "<|im_start|>" * 2
    for spaces in (True, False):  # accepted; a fast tokenizer's decoder puts no spaces around special tokens either way
        extra = {"skip_special_tokens": False, "spaces_between_special_tokens": spaces}
        assert client.completions.create(**args, extra_body=extra).choices[0].text == kept


def test_prompt_logprobs_are_the_engines_own(server, client):
    body = COMPLETION | {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    response = requests.post(f"{server}/v1/completions", json=body | {"prompt_logprobs": 3}, timeout=60).json()
    choice = response["choices"][0]
    entries, echoed = choice["prompt_logprobs"], choice["logprobs"]
    assert len(entries) == response["usage"]["prompt_tokens"] and entries[0] is None
    assert all(len(top) <= 1 for top in echoed["top_logprobs"][1:])  # the echo keeps its own top-k
    for pos, entry in enumerate(entries[1:], start=1):
        token, logprob = echoed["tokens"][pos], echoed["token_logprobs"][pos]
        chosen = next(e for e in entry.values() if e["decoded_token"] == token)
        assert chosen["logprob"] == pytest.approx(logprob)
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked[:3]] == [1, 2, 3] and 3 <= len(entry) <= 4
        assert all(a["logprob"] >= b["logprob"] for a, b in itertools.pairwise(ranked))
        assert chosen["rank"] == 1 + sum(e["logprob"] > chosen["logprob"] for e in entry.values()) or chosen["rank"] > 3
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    prompt_logprobs = chat.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == chat.usage.prompt_tokens and prompt_logprobs[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in prompt_logprobs[1:])


def test_max_completion_tokens_on_completions(client):
    response = client.completions.create(model=MODEL, prompt="Hi", extra_body={"max_completion_tokens": 3, "ignore_eos": True})
    assert response.usage.completion_tokens == 3


def test_openai_fields_without_meaning_here_are_accepted(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=2,
        store=False,
        metadata={"run": "test"},
        service_tier="auto",
        user="someone",
    )
    assert response.usage.completion_tokens <= 2


def test_tokenize_and_detokenize_like_vllm(server, client, tokenizer):
    def post(path: str, body: dict) -> dict:
        response = requests.post(f"{server}/{path}", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    text = "Hello, world"
    plain = post("tokenize", {"model": MODEL, "prompt": text})
    assert plain == {"count": len(plain["tokens"]), "max_model_len": MAX_MODEL_LEN, "tokens": tokenizer.encode(text), "token_strs": None}
    with_strs = post("tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert with_strs["token_strs"] == tokenizer.convert_ids_to_tokens(with_strs["tokens"])
    assert post("detokenize", {"model": MODEL, "tokens": plain["tokens"]}) == {"prompt": text}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = post("tokenize", {"model": MODEL, "messages": messages})
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens  # the tokens chat completions run
    bare = post("tokenize", {"model": MODEL, "messages": messages, "add_generation_prompt": False})
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    assert post("detokenize", {"tokens": chat["tokens"]})["prompt"].startswith("<|im_start|>")


# structured output (docs/structured-output.md)


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=10**9)
    landmarks: list[Annotated[str, Field(max_length=24)]] = Field(min_length=1, max_length=3)


def test_chat_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City, temperature=0, max_tokens=200
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
    assert choice.message.parsed == City.model_validate_json(choice.message.content)


GRAMMAR = 'start: "(" num (op num)* ")"\nop: "+" | "*"\nnum: /[0-9]{1,3}/'
PHONE = "[0-9]{3}-[0-9]{4}"
ITEM = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["id"],
    "additionalProperties": False,
}
CONSTRAINED = [
    ({"structured_outputs": {"regex": PHONE}}, lambda text: re.fullmatch(PHONE, text)),
    ({"guided_regex": PHONE}, lambda text: re.fullmatch(PHONE, text)),
    ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda text: text in ("red", "green", "blue")),
    ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
    ({"structured_outputs": {"grammar": GRAMMAR}}, lambda text: re.fullmatch(r"\([0-9]{1,3}([+*][0-9]{1,3})*\)", text)),
    ({"guided_grammar": GRAMMAR}, lambda text: re.fullmatch(r"\([0-9]{1,3}([+*][0-9]{1,3})*\)", text)),
    ({"structured_outputs": {"json": ITEM}}, lambda text: jsonschema.validate(json.loads(text), ITEM) is None),
    ({"guided_json": json.dumps(ITEM)}, lambda text: jsonschema.validate(json.loads(text), ITEM) is None),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_structured_outputs_and_guided_fields_are_followed(client, endpoint):
    for extra, matches in CONSTRAINED:
        args = {"model": MODEL, "temperature": 1.0, "seed": 7, "max_tokens": 60, "extra_body": extra}
        if endpoint == "chat":
            choice = client.chat.completions.create(messages=[{"role": "user", "content": "Answer."}], **args).choices[0]
            text = choice.message.content
        else:
            choice = client.completions.create(prompt="Answer:", **args).choices[0]
            text = choice.text
        assert choice.finish_reason == "stop" and matches(text), (extra, text)


def test_json_object_streams_into_one_object(client):
    args = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give a JSON object with a name and an age."}],
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "max_tokens": 120,
    }
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content and whole.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


# what is refused, and how

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
STREAM = COMPLETION | {"stream": True}

BAD_REQUESTS = [
    # (case, path under /v1/ (or from the root), body (dict, or raw bytes), status, param, words the message must contain)
    ("empty prompt", "completions", COMPLETION | {"prompt": ""}, 400, "prompt", ["empty"]),
    ("no messages", "chat/completions", CHAT | {"messages": []}, 400, "messages", []),
    ("negative max_tokens", "completions", COMPLETION | {"max_tokens": -1}, 400, "max_tokens", []),
    ("huge max_tokens", "chat/completions", CHAT | {"max_tokens": 10**9}, 400, "max_tokens", ["1024", "1000000"]),
    ("prompt over the context", "completions", COMPLETION | {"prompt": "hello " * 1100}, 400, "prompt", ["1024", "in the prompt"]),
    ("n=1000", "completions", COMPLETION | {"n": 1000}, 400, "n", []),
    ("top_logprobs=50", "chat/completions", CHAT | {"logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", []),
    ("logprobs=50", "completions", COMPLETION | {"logprobs": 50}, 400, "logprobs", []),
    ("suffix", "completions", COMPLETION | {"suffix": "end"}, 400, "suffix", ["suffix"]),
    (
        "json_schema without a schema",
        "chat/completions",
        CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format",
        ["schema"],
    ),
    ("unknown response_format", "chat/completions", CHAT | {"response_format": {"type": "xml"}}, 400, "response_format", []),
    (
        "unsupported schema keyword",
        "chat/completions",
        CHAT | {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
        400,
        "response_format",
        ["uniqueItems"],
    ),
    (
        "regex that does not compile",
        "completions",
        COMPLETION | {"structured_outputs": {"regex": "a(b"}},
        400,
        "structured_outputs",
        ["regex"],
    ),
    ("grammar that does not compile", "chat/completions", CHAT | {"guided_grammar": "start: nothing"}, 400, "guided_grammar", ["nothing"]),
    ("guided_json not JSON", "completions", COMPLETION | {"guided_json": "{oops"}, 400, "guided_json", ["JSON"]),
    ("empty guided_choice", "completions", COMPLETION | {"guided_choice": []}, 400, "guided_choice", ["choice"]),
    ("constraint over the size limit", "completions", COMPLETION | {"guided_regex": "a" * 40000}, 400, "guided_regex", ["40000", "32768"]),
    ("two constraints", "completions", COMPLETION | {"guided_regex": "a", "guided_choice": ["b"]}, 400, "guided_choice", ["guided_regex"]),
    (
        "structured_outputs with two kinds",
        "chat/completions",
        CHAT | {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        400,
        "structured_outputs",
        [],
    ),
    (
        "unknown structured_outputs field",
        "completions",
        COMPLETION | {"structured_outputs": {"structural_tag": "x"}},
        400,
        "structured_outputs",
        [],
    ),
    ("stream_options without stream", "completions", COMPLETION | {"stream_options": {"include_usage": True}}, 400, "stream_options", []),
    ("unknown model", "completions", COMPLETION | {"model": "gpt-5"}, 404, "model", ["gpt-5"]),
    ("unknown field", "completions", COMPLETION | {"best_of": 3}, 400, "best_of", ["best_of"]),
    (
        "unknown chat field",
        "chat/completions",
        CHAT | {"guided_decoding_backend": "xgrammar"},
        400,
        "guided_decoding_backend",
        ["guided_decoding_backend"],
    ),
    ("logit_bias out of range", "completions", COMPLETION | {"logit_bias": {"5": 200}}, 400, "logit_bias", ["100"]),
    ("logit_bias key not a token id", "chat/completions", CHAT | {"logit_bias": {"abc": 1}}, 400, "logit_bias", []),
    ("logit_bias outside the vocabulary", "completions", COMPLETION | {"logit_bias": {"999999": 1}}, 400, "logit_bias", ["49152"]),
    ("logit_bias not an object", "completions", COMPLETION | {"logit_bias": [1, 2]}, 400, "logit_bias", []),
    ("negative min_tokens", "completions", COMPLETION | {"min_tokens": -1}, 400, "min_tokens", []),
    ("min_tokens over max_tokens", "chat/completions", CHAT | {"min_tokens": 10}, 400, "min_tokens", ["max_tokens"]),
    ("stop_token_ids not ids", "completions", COMPLETION | {"stop_token_ids": ["a"]}, 400, "stop_token_ids", []),
    ("stop_token_ids outside the vocabulary", "chat/completions", CHAT | {"stop_token_ids": [10**6]}, 400, "stop_token_ids", []),
    ("prompt_logprobs=50", "completions", COMPLETION | {"prompt_logprobs": 50}, 400, "prompt_logprobs", []),
    ("prompt_logprobs with stream", "chat/completions", CHAT | {"prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs", ["stream"]),
    ("skip_special_tokens not a bool", "completions", COMPLETION | {"skip_special_tokens": "no"}, 400, "skip_special_tokens", []),
    ("continuous usage not bool", "completions", STREAM | {"stream_options": {"continuous_usage_stats": 1}}, 400, "stream_options", []),
    ("unknown stream option", "completions", STREAM | {"stream_options": {"usage": True}}, 400, "stream_options", ["usage"]),
    ("huge max_completion_tokens", "completions", COMPLETION | {"max_completion_tokens": 10**9}, 400, "max_completion_tokens", []),
    ("store not a bool", "chat/completions", CHAT | {"store": "yes"}, 400, "store", []),
    ("metadata not strings", "chat/completions", CHAT | {"metadata": {"a": 1}}, 400, "metadata", []),
    ("tokenize: unknown model", "/tokenize", {"model": "gpt-5", "prompt": "x"}, 404, "model", ["gpt-5"]),
    ("tokenize: unknown field", "/tokenize", {"model": MODEL, "prompt": "x", "truncate": 3}, 400, "truncate", ["truncate"]),
    ("tokenize: no prompt", "/tokenize", {"model": MODEL}, 400, "prompt", []),
    ("tokenize: empty messages", "/tokenize", {"model": MODEL, "messages": []}, 400, "messages", []),
    ("detokenize: unknown model", "/detokenize", {"model": "gpt-5", "tokens": [1]}, 404, "model", ["gpt-5"]),
    ("detokenize: ids outside the vocabulary", "/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens", ["49152"]),
    ("detokenize: not ids", "/detokenize", {"model": MODEL, "tokens": "abc"}, 400, "tokens", []),
    ("wrong type", "completions", COMPLETION | {"max_tokens": "ten"}, 400, "max_tokens", []),
    ("wrong message type", "chat/completions", CHAT | {"messages": [{"role": "user", "content": 5}]}, 400, "messages", []),
    ("malformed JSON", "completions", b'{"model": "x", "prompt": ', 400, None, ["JSON"]),
    ("invalid UTF-8", "completions", b'{"model": "\xff\xfe", "prompt": "x"}', 400, None, []),
    ("not an object", "completions", b"[1, 2]", 400, None, []),
    ("huge body", "completions", b'{"prompt": "' + b"a" * (3 * 2**20) + b'"}', 413, None, ["bytes"]),
]


@pytest.mark.parametrize("case, path, body, status, param, words", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_openai_error(server, case, path, body, status, param, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f"{server}{path}" if path.startswith("/") else f"{server}/v1/{path}"
    response = requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert all(word in error["message"] for word in words), error["message"]


def test_huge_body_without_content_length_gets_413(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(48):
            yield b"a" * 2**16

    response = requests.post(f"{server}/v1/completions", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_server_is_healthy_after_bad_requests(server, client):
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert response.usage.completion_tokens == 4 or response.choices[0].finish_reason == "stop"


def test_unknown_route_is_404_in_openai_format(server):
    response = requests.get(f"{server}/v1/engines", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"


# load, disconnects, health and metrics


def _long_stream(server: str) -> requests.Response:
    """A streaming request that would run for a minute."""
    body = COMPLETION | {"max_tokens": 800, "ignore_eos": True, "stream": True}
    return requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120)


def test_full_queue_gets_503_with_retry_after(server):
    """A burst three times what the replica runs and queues, sent at once: Serve's own queue check let 15-17 of 36
    through at a limit of 12 (serving/server/llm_client.py, ServeLLMClient); no more than the limit may be served."""
    answers: list[tuple[int, str | None, bytes]] = []  # status, Retry-After, body of the refused
    lock = threading.Lock()
    release = threading.Event()
    burst = 3 * (MAX_ONGOING + MAX_QUEUED)
    start = threading.Barrier(burst)

    def hold_one() -> None:
        start.wait(30)
        response = _long_stream(server)
        refused = response.content if response.status_code != 200 else b""  # read before the connection closes
        with lock:
            answers.append((response.status_code, response.headers.get("Retry-After"), refused))
        release.wait(120)
        response.close()

    threads = [threading.Thread(target=hold_one) for _ in range(burst)]
    for thread in threads:
        thread.start()
    deadline, answered, settled = time.monotonic() + 60, -1, time.monotonic()
    while time.monotonic() < min(deadline, settled + 3):  # until 3 s pass without an answer; queued ones wait on
        if len(answers) != answered:
            answered, settled = len(answers), time.monotonic()
        time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join(120)
    statuses = [status for status, _, _ in answers]
    assert len(statuses) == len(threads) and set(statuses) == {200, 503}, statuses
    assert statuses.count(200) <= MAX_ONGOING + MAX_QUEUED, statuses
    for status, retry_after, body in answers:
        if status == 503:
            assert retry_after == "1" and json.loads(body)["error"]["code"] == "overloaded"
    assert wait_until_idle(server)["llmcluster_requests_running"] == 0


@pytest.mark.parametrize(
    "prompts, stream", [(["Hi"], True), (["Hi", "Hello"], True), (["Hi"], False)], ids=["stream", "stream-2-prompts", "non-stream"]
)
def test_disconnect_aborts_the_request(server, prompts, stream):
    idle = wait_until_idle(server)
    assert idle["llmcluster_kv_cache_usage_ratio"] == 0
    body = COMPLETION | {"prompt": prompts, "max_tokens": 800, "ignore_eos": True, "stream": stream}
    if stream:
        response = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120)
        lines = response.iter_lines()  # kept open: a dropped line iterator closes the connection when collected
        assert next(line for line in lines if line).startswith(b"data: ")
        close: Callable[[], None] = response.close
    else:
        thread = threading.Thread(target=_post_and_give_up, args=(f"{server}/v1/completions", body))
        thread.start()
        close = thread.join  # the client gives up after a few seconds
    busy = engine_state(server)
    deadline = time.monotonic() + 30
    while busy["llmcluster_requests_running"] < len(prompts) and time.monotonic() < deadline:
        busy = engine_state(server)
    assert busy["llmcluster_requests_running"] == len(prompts) and busy["llmcluster_kv_cache_usage_ratio"] > 0
    close()
    after = wait_until_idle(server)
    assert after["llmcluster_requests_running"] == 0 and after["llmcluster_kv_cache_usage_ratio"] == 0


def _post_and_give_up(url: str, body: dict) -> None:
    """A client that times out after 4 s, closing its connection mid-request."""
    try:
        requests.post(url, json=body, timeout=(10, 4))
    except requests.exceptions.ReadTimeout:
        return
    raise AssertionError("the request was meant to outlast the client's patience")


def test_health_and_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    requests.post(f"{server}/v1/completions", json=COMPLETION | {"n": 0}, timeout=30)
    health = requests.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    metrics = requests.get(f"{server}/metrics", timeout=30)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    counts = {(s.labels["route"], s.labels["status_class"]) for s in families["llmcluster_http_requests"].samples}
    assert {("/v1/completions", "2xx"), ("/v1/completions", "4xx"), ("/v1/chat/completions", "2xx"), ("/health", "2xx")} <= counts
    for name in ("requests_running", "requests_waiting", "kv_cache_usage_ratio", "replica_healthy"):
        [sample] = families[f"llmcluster_{name}"].samples
        assert sample.labels["model"] == MODEL and sample.labels["replica"]


def test_replica_logs_reach_their_files_as_requests_are_answered(server):
    """An operator reading a replica's log sees each request's access line within seconds, not once Serve has
    buffered a thousand of them (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE in SERVE_CONTROLLER_ENV)."""
    response = requests.get(f"{server}/v1/models", timeout=30)
    line = f"{response.headers['x-request-id']} -- GET /v1/models 200"
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 10
    while not any(line in path.read_text() for path in logs.glob("replica_*_APIIngress_*.log")):
        assert time.monotonic() < deadline, f"no {line!r} in {sorted(p.name for p in logs.iterdir())}"
        time.sleep(0.2)
