"""What `deploy` refuses before Serve sees the application, and the replica's own error when one fails to start.

The cluster is a private Ray session with 2 CPUs, like the laptop the README's commands run on."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import ray
import requests
from ray import serve

from cluster.local import init_private_session
from serving.config import EngineConfig, LLMConfig, ModelConfig, ParallelConfig, ServerConfig
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.errors import DeploymentError, UnsupportedModelError
from serving.models.arch import ModelArch
from serving.models.sharding import InvalidLayoutError
from serving.server.deploy_checks import check_cluster_resources, check_model_layout, replica_error
from serving.server.deployments import deploy
from tests.ports import free_port

PORT = free_port()  # one for the module: Serve keeps the HTTP port it first started with


def _config(model, tp: int = 1, pp: int = 1, worker_cpus: float = 1.0, **server) -> LLMConfig:
    return LLMConfig(
        model=ModelConfig(source=str(model), max_model_len=256),
        engine=EngineConfig(block_size=4, kv_cache_memory_gb=0.01),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, worker_cpus=worker_cpus, placement_timeout_s=20),
        server=ServerConfig(port=PORT, **server),
    )


def test_layouts_the_model_cannot_take_are_named(tiny_model):
    with pytest.raises(InvalidLayoutError, match="tensor parallel size 3 does not divide the model's 4 attention heads"):
        check_model_layout(_config(tiny_model, tp=3), tiny_model)
    with pytest.raises(InvalidLayoutError, match="4 pipeline stages for a model of only 3 layers"):
        check_model_layout(_config(tiny_model, pp=4), tiny_model)
    too_long = _config(tiny_model).model_copy(update={"model": ModelConfig(source=str(tiny_model), max_model_len=1024)})
    with pytest.raises(InvalidLayoutError, match="max_model_len 1024 exceeds the model's context length 512"):
        check_model_layout(too_long, tiny_model)
    check_model_layout(_config(tiny_model, tp=2, pp=3), tiny_model)


def test_a_config_with_only_a_model_type_loads_as_transformers_would(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "no-architectures")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    assert ModelArch.from_folder(folder).architecture == "LlamaForCausalLM"
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    [with_type] = LLM(str(folder), block_size=4, kv_cache_memory_gb=0.01).generate(["Hello"], params, use_tqdm=False)
    [with_arch] = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.01).generate(["Hello"], params, use_tqdm=False)
    assert with_type.outputs[0].token_ids == with_arch.outputs[0].token_ids
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported"):
        ModelArch.from_folder(folder)


def test_the_replicas_own_exception_is_taken_from_serves_message():
    message = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial "
        "health check failing. See controller logs for details. Error:\nray::ServeReplica:llm:LLMDeployment() (pid=1)\n"
        "RuntimeError: Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise ValueError('a')\n"
        "serving.models.sharding.InvalidLayoutError: tensor parallel size 2 does not divide the model's 9 attention heads\n"
    )
    assert replica_error(message) == "InvalidLayoutError: tensor parallel size 2 does not divide the model's 9 attention heads"
    assert replica_error("Failed to update the deployments ['LLMDeployment'].") == "Failed to update the deployments ['LLMDeployment']."


@pytest.fixture(scope="module")
def two_cpus():
    """A Ray session of 2 CPUs whose Serve gives up on a replica after its first failed start."""
    os.environ["RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT"] = "1"  # read by the Serve controller this session starts
    try:
        init_private_session(num_cpus=2)
    finally:
        del os.environ["RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT"]
    yield
    serve.shutdown()
    ray.shutdown()


def test_what_the_cluster_cannot_hold_is_refused_with_the_numbers(two_cpus, tiny_model):
    with pytest.raises(
        InvalidLayoutError, match=r"no node can hold a tensor-parallel group of 4 workers needing \{'CPU': 1.0\}.*worker_cpus"
    ):
        check_cluster_resources(_config(tiny_model, tp=4))
    with pytest.raises(InvalidLayoutError, match="2 LLM replica\\(s\\) of 1 worker\\(s\\) each reserve 3 CPU; the whole cluster has 2 CPU"):
        check_cluster_resources(_config(tiny_model, min_replicas=2, max_replicas=2, replica_cpus=1.5))
    with pytest.raises(InvalidLayoutError, match="no node can hold an LLM replica reserving 3 CPU.*parallel.cluster_autoscales"):
        check_cluster_resources(_config(tiny_model, replica_cpus=3))
    with pytest.raises(InvalidLayoutError, match="no node of the Ray cluster has a GPU"):
        check_cluster_resources(_config(tiny_model).model_copy(update={"model": ModelConfig(source=str(tiny_model), device="cuda")}))
    check_cluster_resources(_config(tiny_model, tp=4, worker_cpus=0.5))
    autoscaling = ParallelConfig(tensor_parallel=4, cluster_autoscales=True)  # nodes come on demand: nothing refused
    check_cluster_resources(_config(tiny_model, replica_cpus=4).model_copy(update={"parallel": autoscaling}))


@pytest.mark.slow
def test_a_replica_that_fails_to_start_reports_its_own_error(two_cpus, tiny_model):
    config = _config(tiny_model).model_copy(update={"engine": EngineConfig(block_size=4, kv_cache_memory_gb=0.00001)})
    with pytest.raises(DeploymentError, match="LLMDeployment: ValueError: KV cache budget holds \\d+ tokens.*raise kv_cache_memory_gb"):
        deploy(config, timeout_s=120)
    serve.delete(config.server.app_name)


@pytest.mark.slow
def test_fractional_worker_cpus_put_four_workers_on_two_cores(two_cpus, tiny_model):
    config = _config(tiny_model, tp=4, worker_cpus=0.5)
    url = deploy(config, timeout_s=300)
    try:
        body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        answer = requests.post(f"{url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        [single] = LLM(config=_config(tiny_model)).generate(
            ["Hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False
        )
        assert answer.json()["choices"][0]["text"] == single.outputs[0].text
    finally:
        serve.delete(config.server.app_name)
