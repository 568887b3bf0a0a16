"""logit_bias, min_tokens, stop_token_ids and prompt logprob ranks in the engine, on the tiny model."""

from __future__ import annotations

import pytest
from reference import load_reference, reference_logprobs

from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.errors import InvalidRequestError

PROMPT = "Hello there, general"


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02)


def tokens(llm: LLM, **params) -> list[int]:
    return llm.generate([PROMPT], SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_steers_greedy_and_random_sampling_and_leaves_the_batch_alone(llm):
    greedy = tokens(llm, max_tokens=6, temperature=0, ignore_eos=True)
    forced = 40 if greedy[0] != 40 else 41
    assert tokens(llm, max_tokens=6, temperature=0, ignore_eos=True, logit_bias={forced: 100}) == [forced] * 6
    assert tokens(llm, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logit_bias={forced: 100}) == [forced] * 6
    banned = tokens(llm, max_tokens=6, temperature=0, ignore_eos=True, logit_bias={greedy[0]: -100})
    assert banned[0] != greedy[0]
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    biased = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={forced: 100, greedy[1]: -5.5})
    batch = llm.generate([PROMPT, PROMPT, PROMPT], [plain, biased, plain], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batch] == [greedy, [forced] * 6, greedy]


def test_logprobs_are_the_models_own_whatever_the_bias(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, logprobs=3), use_tqdm=False)[0].outputs[0]
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=3, logit_bias={40: 100})
    biased = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert biased.token_ids == [40] and biased.logprobs[0][1] == plain.logprobs[0][1]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(llm):
    eos = 2  # the tiny model's <|im_end|>
    assert tokens(llm, max_tokens=10, temperature=0, logit_bias={eos: 100}) == [eos]
    out = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, min_tokens=4, logit_bias={eos: 100}), use_tqdm=False)
    completion = out[0].outputs[0]
    assert len(completion.token_ids) == 5 and eos not in completion.token_ids[:4] and completion.token_ids[4] == eos
    assert completion.finish_reason == "stop"
    params = SamplingParams(max_tokens=10, temperature=0, min_tokens=3, stop_token_ids=[40], logit_bias={40: 100})
    completion = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert completion.token_ids[3] == 40 and 40 not in completion.token_ids[:3] and len(completion.token_ids) == 4
    assert (completion.finish_reason, completion.stop_reason) == ("stop", 40)


def test_min_tokens_defers_stop_strings(llm):
    free = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = next(c for c in llm.tokenizer.decode(free.token_ids[:6]) if not c.isspace())  # appears within 6 tokens
    early = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]), use_tqdm=False)
    assert len(early[0].outputs[0].token_ids) <= 6 and early[0].outputs[0].finish_reason == "stop"
    held = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop], min_tokens=12)
    late = llm.generate([PROMPT], held, use_tqdm=False)[0].outputs[0]
    assert late.token_ids == free.token_ids and late.finish_reason == "length"


def test_stop_token_ids_and_logit_bias_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.vocab_size
    for params, name in ((dict(stop_token_ids=[vocab]), "stop_token_ids"), (dict(logit_bias={vocab + 5: 1.0}), "logit_bias")):
        with pytest.raises(InvalidRequestError) as error:
            llm.generate([PROMPT], SamplingParams(**params), use_tqdm=False)
        assert error.value.param == name


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_sampling_params_refuse_out_of_range_values(params, name):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**params)
    assert error.value.param == name


def test_prompt_logprob_ranks_match_transformers(llm, tiny_model):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    reference = reference_logprobs(load_reference(tiny_model), out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None
    for pos, (logprob, top, rank) in enumerate(out.prompt_logprobs[1:], start=1):
        row = reference[pos - 1]
        token = out.prompt_token_ids[pos]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert rank == int((row > row[token]).sum()) + 1
        assert list(top) == row.topk(2).indices.tolist()


def test_a_stop_token_s_text_is_kept_only_with_include_stop_str_in_output(llm):
    free = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = free.token_ids[2]
    upto = free.token_ids.index(stop) + 1

    def text(**params) -> str:
        return llm.generate([PROMPT], SamplingParams(temperature=0, ignore_eos=True, **params), use_tqdm=False)[0].outputs[0].text

    assert text(max_tokens=6, stop_token_ids=[stop]) == (text(max_tokens=upto - 1) if upto > 1 else "")
    assert text(max_tokens=6, stop_token_ids=[stop], include_stop_str_in_output=True) == text(max_tokens=upto)


def test_a_prompt_logprobs_over_the_servers_limit_names_prompt_logprobs():
    from serving.config import LimitsConfig
    from serving.server.limits import limit_sampling

    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be at most 2") as error:
        limit_sampling(SamplingParams(prompt_logprobs=3), LimitsConfig(max_logprobs=2), max_tokens_given=False)
    assert error.value.param == "prompt_logprobs"  # not "logprobs", which chat renames to top_logprobs
