"""Constrained decoding in the engine: masks, matcher state through n > 1, seeds, logprobs, chunked
prefill and preemption, compile errors and the grammar cache; validity of sampled JSON on the default model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from serving.engine.llm import LLM
from serving.engine.sampling_params import OutputConstraint, SamplingParams
from serving.engine.structured import _forbidden, _forbidden_on_device, apply_masks
from serving.errors import InvalidRequestError


def regex(pattern: str) -> OutputConstraint:
    return OutputConstraint("regex", pattern)


def choice(*options: str) -> OutputConstraint:
    return OutputConstraint("choice", json.dumps(list(options)))


def schema(value: dict) -> OutputConstraint:
    return OutputConstraint("json", json.dumps(value))


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02)


def texts(llm: LLM, prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[list[str]]:
    return [[c.text for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]


# the mask


def test_apply_masks_changes_only_the_constrained_rows():
    vocab = 70  # not a multiple of 32: the last word's bits past the vocabulary are ignored
    logits = torch.randn(4, vocab)
    before = logits.clone()
    allowed = {1: [0, 5, 33, 69], 3: [64]}
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for row, tokens in enumerate(allowed.values()):
        for t in tokens:
            bitmask[row, t // 32] |= 1 << (t % 32)
    apply_masks(logits, [1, 3], bitmask)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    for row, tokens in allowed.items():
        kept = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert kept == tokens
        assert torch.equal(logits[row, tokens], before[row, tokens])


def test_bitmask_unpacks_the_same_on_cpu_and_on_devices():
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32)
    assert torch.equal(_forbidden(bitmask, torch.device("cpu")), _forbidden_on_device(bitmask))


def test_apply_masks_forbids_tokens_past_the_tokenizers_vocabulary():
    logits = torch.zeros(1, 100)  # a model vocabulary padded past the 64 tokens the mask covers
    apply_masks(logits, [0], torch.full((1, 2), -1, dtype=torch.int32))
    assert torch.isfinite(logits[0, :64]).all() and torch.isinf(logits[0, 64:]).all()


def test_constrained_and_free_rows_share_a_step(llm):
    """One step samples both: the constrained row follows its regex, the free one is what it is alone."""
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = texts(llm, ["Tell me a story"], free)[0]
    constrained = SamplingParams(max_tokens=8, temperature=0, constraint=regex("[0-9]{3}-[a-c]{2}"))
    both = texts(llm, ["Tell me a story", "Give a code"], [free, constrained])
    assert both[0] == alone
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", both[1][0])


# matcher state and sampling modes


def test_grammar_end_stops_and_max_tokens_cuts(llm):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3, constraint=choice("alpha", "beta"))
    out = llm.generate(["Pick one"], params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"
    cut = SamplingParams(max_tokens=2, temperature=0, constraint=regex("x{50}"))
    out = llm.generate(["Pick one"], cut, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2 and set(out.text) == {"x"}


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 1.0}, {"temperature": 1.5, "top_k": 5}, {"temperature": 1.2, "top_p": 0.5}]
)
def test_every_sampling_mode_follows_the_grammar(llm, sampling):
    pattern = "(yes|no), [0-9]{1,4}( [a-z]{1,6}){0,3}\\."
    params = SamplingParams(max_tokens=40, seed=11, n=3, constraint=regex(pattern), **sampling)
    for text in texts(llm, ["Answer", "Another"], params)[0]:
        assert re.fullmatch(pattern, text), text


def test_n_children_keep_their_own_matcher_state(llm):
    pattern = "[a-z]{2,12}"
    params = SamplingParams(max_tokens=20, temperature=1.5, seed=5, n=4, constraint=regex(pattern))
    children = texts(llm, ["Words"], params)[0]
    assert all(re.fullmatch(pattern, t) for t in children)
    assert len(set(children)) > 1  # different samples, each complete on its own


def test_seeded_constrained_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=42, constraint=regex("[a-z ]{5,30}"))
    alone = texts(llm, ["Hello"], params)[0]
    others = SamplingParams(max_tokens=10, temperature=1.0, constraint=regex("[0-9]+"))
    batch = texts(llm, ["Other", "Hello", "Free"], [others, params, SamplingParams(max_tokens=6)])
    assert batch[1] == alone


def test_logprobs_are_those_of_the_constrained_distribution(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1, logprobs=20, constraint=choice("yes", "no"))
    out = llm.generate(["Question"], params, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.tokenizer
    for i, (chosen, top) in enumerate(out.logprobs):
        allowed = {t for t, lp in top.items() if lp > float("-inf")}
        # the few tokens that continue a choice hold all the probability; the top 20 reach forbidden ones at -inf
        prefix = tokenizer.decode(out.token_ids[:i])
        assert all(any(c.startswith(prefix + tokenizer.decode([t])) for c in ("yes", "no")) for t in allowed)
        assert len(allowed) < len(top)
        assert sum(torch.tensor([top[t] for t in allowed]).exp()) == pytest.approx(1.0, abs=1e-4)
        assert chosen == top[out.token_ids[i]]


def test_chunked_prefill_prefix_caching_and_preemption_keep_the_output(tiny_model):
    prompts = [f"Request number {i} asks for a long answer, " * 3 for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, constraint=regex("([a-z]{3,8} ){5}[0-9]{4}"))
    roomy = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02).generate(prompts, params, use_tqdm=False)
    bytes_per_block = 2 * 3 * 2 * 16 * 4 * 4
    cramped = LLM(
        str(tiny_model), block_size=4, kv_cache_memory_gb=80 * bytes_per_block / 2**30, max_model_len=128, max_num_batched_tokens=16
    )
    tight = cramped.generate(prompts, params, use_tqdm=False)
    assert cramped.engine.scheduler.num_preemptions > 0 and cramped.engine.blocks.prefix_hits > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    assert all(o.outputs[0].finish_reason == "stop" for o in tight)
    assert not cramped.engine.constrained  # finished sequences let their matchers go


# compiling


@pytest.mark.parametrize(
    "constraint, words",
    [
        (regex("a(b"), ["regex", "unclosed group"]),
        (OutputConstraint("grammar", "start: missing_rule"), ["grammar", "missing_rule"]),
        (schema({"type": "array", "uniqueItems": True}), ["JSON schema", "uniqueItems"]),
        (OutputConstraint("json", "{not json"), ["JSON schema", "not JSON"]),
        (choice(), ["choice"]),
    ],
)
def test_bad_constraints_are_invalid_requests(llm, constraint, words):
    with pytest.raises(InvalidRequestError) as raised:
        llm.engine.add_request("bad", "Hi", SamplingParams(constraint=constraint))
    assert raised.value.param == "constraint"
    assert all(w in str(raised.value) for w in words), str(raised.value)
    assert not llm.engine.has_unfinished_requests()


def test_compiled_grammars_are_cached_by_content_and_bounded(llm):
    grammars = llm.engine.grammars
    first = schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    grammars.matcher(first)
    assert grammars.is_cached(schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    for i in range(grammars.cache_size):
        grammars.matcher(regex(f"[a-z]{{{i + 1}}}"))
    assert not grammars.is_cached(first)  # the least recently used one made room


# validity of sampled JSON on the real model

SCHEMAS: dict[str, dict] = {
    "flat object": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "email": {"type": "string", "maxLength": 16}},
                "required": ["id", "email"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array with min and max items": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "numbers with bounds": {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 100},
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50},
        },
        "required": ["price", "count"],
        "additionalProperties": False,
    },
    "string pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "date": {"type": "string", "pattern": "^2[0-9]{3}-[01][0-9]$"},
        },
        "required": ["code", "date"],
        "additionalProperties": False,
    },
    "optional fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 16},
            "subtitle": {"type": "string", "maxLength": 10},
            "pages": {"type": "integer", "minimum": 1, "maximum": 900},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "$defs and $ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "array of objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "anyOf and nullable": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 6}]},
            "note": {"type": ["string", "null"], "maxLength": 8},
        },
        "required": ["value", "note"],
        "additionalProperties": False,
    },
    "booleans and const": {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "ok": {"type": "boolean"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["version", "ok", "flags"],
        "additionalProperties": False,
    },
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def default_llm(default_model) -> LLM:
    return LLM(str(default_model), max_model_len=512, kv_cache_memory_gb=0.25)


def assert_sampled_json_validates(llm: LLM, names: list[str], seeds: tuple[int, ...]) -> None:
    """Each schema of SCHEMAS named in `names`, sampled once per seed: every completion stops and validates."""
    # one short prompt for all (its KV is computed once): the grammar, not the prompt, makes the output valid
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Reply with a small JSON example."}])
    cases = [(name, seed) for name in names for seed in seeds]
    params = [SamplingParams(max_tokens=160, temperature=1.0, seed=seed, constraint=schema(SCHEMAS[name])) for name, seed in cases]
    for (name, _), out in zip(cases, llm.generate([prompt] * len(cases), params, use_tqdm=False)):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMAS[name])


@pytest.mark.slow
def test_sampled_json_always_validates(default_llm):
    assert_sampled_json_validates(default_llm, list(SCHEMAS), SEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4", "gguf"])
def test_sampled_json_validates_from_quantized_weights(default_model, quantization):
    """The mask applies to the logits whatever format the weights are in: JSON sampled from the quantized default
    model (gguf: its own Q4_1 file) validates as it does in float32."""
    llm = LLM(str(default_model), max_model_len=512, kv_cache_memory_gb=0.25, quantization=quantization)
    assert_sampled_json_validates(llm, ["nested objects", "string pattern", "array of objects", "anyOf and nullable"], (0,))


# tensor parallelism


@pytest.fixture(scope="module")
def ray_session():
    import ray  # here, not at the top: the other tests of this module run without Ray

    from cluster.local import init_private_session

    init_private_session(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_tensor_parallel_replica_constrains_as_one_worker_does(ray_session, tiny_model):
    """The mask is applied on the driver's logits whatever the layout: the same tokens, greedy and seeded."""
    from serving.config import EngineConfig, LLMConfig, ModelConfig, ParallelConfig

    def config(tp: int) -> LLMConfig:
        return LLMConfig(
            model=ModelConfig(source=str(tiny_model), max_model_len=128),
            engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.01),
            parallel=ParallelConfig(tensor_parallel=tp, worker_cpus=0.5, placement_timeout_s=30),
        )

    item = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["id"]}
    params = [
        SamplingParams(max_tokens=30, temperature=0, constraint=regex("[a-z]{3,8}-[0-9]{2}")),
        SamplingParams(max_tokens=30, temperature=1.0, seed=4, constraint=schema(item)),
        SamplingParams(max_tokens=30, temperature=1.0, seed=5, n=2, constraint=choice("north", "south", "east")),
    ]
    prompts = ["A code:", "Some JSON:", "A direction:"]
    single = [[c.token_ids for c in o.outputs] for o in LLM(config=config(1)).generate(prompts, params, use_tqdm=False)]
    parallel = LLM(config=config(2))
    try:
        assert len(parallel.engine.runner.node_ids()) == 2  # two workers, one per rank
        outputs = parallel.generate(prompts, params, use_tqdm=False)
    finally:
        parallel.engine.runner.shutdown()
    assert [[c.token_ids for c in o.outputs] for o in outputs] == single
    assert re.fullmatch("[a-z]{3,8}-[0-9]{2}", outputs[0].outputs[0].text) and outputs[0].outputs[0].finish_reason == "stop"
    assert all(c.text in ("north", "south", "east") for c in outputs[2].outputs)
