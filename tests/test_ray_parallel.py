"""Tensor and pipeline parallelism on Ray worker actors across a multi-node Ray cluster.

The cluster is real: a head and two worker nodes, each its own raylet with its own resources,
started by the test. Outputs must equal the single-worker engine's.
"""

from __future__ import annotations

import pytest
import ray
from reference import max_summary_difference, output_summary

from serving.config import EngineConfig, LLMConfig, ModelConfig, ParallelConfig
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.models.sharding import InvalidLayoutError

PROMPTS = ["The capital of France is", "1, 2, 3,", "Tokyo 東京 🎌 and", "def f(x):"]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=5, prompt_logprobs=3, ignore_eos=True)


def _config(folder, tp: int, pp: int, quantization: str = "none", **engine) -> LLMConfig:
    return LLMConfig(
        model=ModelConfig(source=str(folder), max_model_len=256, quantization=quantization),
        engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.01, **engine),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, placement_timeout_s=10),
    )


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_layouts_match_single_worker(cluster, tiny_model, tp, pp):
    reference = [output_summary(o) for o in LLM(config=_config(tiny_model, 1, 1)).generate(PROMPTS, PARAMS, use_tqdm=False)]
    llm = LLM(config=_config(tiny_model, tp, pp, max_num_batched_tokens=16))
    try:
        outputs = [output_summary(o) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        nodes = llm.engine.runner.node_ids()
        stage_nodes = [nodes[s * tp] for s in range(pp)]
        assert all(nodes[s * tp + r] == stage_nodes[s] for s in range(pp) for r in range(tp))  # a TP group shares a node
        assert len(set(stage_nodes)) == pp  # stages on different nodes
    finally:
        llm.engine.runner.shutdown()
    assert [o[0] for o in outputs] == [r[0] for r in reference]
    assert max_summary_difference(outputs, reference) < 1e-4


def _assert_matches_single_worker(parallel: LLMConfig, single: LLMConfig) -> None:
    """Greedy tokens identical and logprobs within 1e-4 of the single-worker engine's."""
    reference = [output_summary(o) for o in LLM(config=single).generate(PROMPTS, PARAMS, use_tqdm=False)]
    llm = LLM(config=parallel)
    try:
        outputs = [output_summary(o) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    finally:
        llm.engine.runner.shutdown()
    assert [o[0] for o in outputs] == [r[0] for r in reference]
    assert max_summary_difference(outputs, reference) < 1e-4


@pytest.mark.slow
def test_quantized_tp2xpp2_matches_single_worker(cluster, tiny_model):
    """int4 layers with an int8 embedding and LM head, split over stages (the tied head on the last) and ranks."""
    _assert_matches_single_worker(_config(tiny_model, 2, 2, "int4", max_num_batched_tokens=16), _config(tiny_model, 1, 1, "int4"))


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
def test_default_model_parallel_matches_single_worker(cluster, default_model, tp, pp):
    config = LLMConfig(
        model=ModelConfig(source=str(default_model), max_model_len=128),
        engine=EngineConfig(kv_cache_memory_gb=0.05),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
    )
    _assert_matches_single_worker(config, config.model_copy(update={"parallel": ParallelConfig()}))


@pytest.mark.slow
def test_layouts_the_cluster_can_never_hold_fail_fast(cluster, tiny_model, default_model):
    with pytest.raises(InvalidLayoutError, match="no node can hold a tensor-parallel group of 4"):
        LLM(config=_config(tiny_model, 4, 1))
    with pytest.raises(InvalidLayoutError, match="exceed the whole cluster"):
        LLM(config=_config(default_model, 3, 3))
    with pytest.raises(InvalidLayoutError, match="9 attention heads"):
        LLM(config=_config(default_model, 2, 1))
    with pytest.raises(InvalidLayoutError, match="pipeline stages for a model of only 3 layers"):
        LLM(config=_config(tiny_model, 1, 5))


@pytest.mark.slow
def test_pipeline_keeps_several_steps_in_flight(cluster, tiny_model):
    llm = LLM(config=_config(tiny_model, 1, 2, max_num_seqs=8))
    engine = llm.engine
    try:
        for i in range(8):
            engine.add_request(str(i), f"request {i}", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        deepest, finished = 0, {}
        while engine.has_unfinished_requests():
            finished |= {o.request_id: o for o in engine.step() if o.finished}
            deepest = max(deepest, len(engine.launched_steps) + 1)
        assert deepest == 2 and len(finished) == 8
        reference = LLM(config=_config(tiny_model, 1, 1)).generate(
            [f"request {i}" for i in range(8)], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False
        )
        assert [finished[str(i)].outputs[0].token_ids for i in range(8)] == [o.outputs[0].token_ids for o in reference]
    finally:
        engine.runner.shutdown()


@pytest.mark.slow
def test_a_dead_worker_fails_the_replica_quickly(cluster, tiny_model):
    import time

    from serving.errors import EngineDeadError

    llm = LLM(config=_config(tiny_model, 2, 1))
    engine = llm.engine
    try:
        engine.add_request("r", "keep going", SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        ray.kill(engine.runner.workers[1])
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker died"):
            for _ in range(200):
                engine.step()
        assert time.monotonic() - started < 10
    finally:
        engine.runner.shutdown()
