"""What an LLM replica reserves in Ray (server.replica_cpus / replica_gpus) and the autoscaling flag of placement."""

from __future__ import annotations

import argparse

import pytest

from serving.config import LLMConfig
from serving.config_flags import add_config_flags, config_from_args
from serving.server.replica_resources import replica_actor_options


def config(**sections: dict) -> LLMConfig:
    return LLMConfig.model_validate(sections)


def test_default_replica_reserves_nothing_so_it_fits_any_node():
    assert replica_actor_options(LLMConfig()) == {"num_cpus": 0.0}


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"device": "cuda"}}, {"num_cpus": 0.0, "num_gpus": 1.0}),  # a replica running the model on CUDA gets its GPU
        ({"model": {"device": "auto"}}, {"num_cpus": 0.0}),  # undecided until the replica starts: no GPU reserved
        ({"model": {"device": "cuda"}, "parallel": {"tensor_parallel": 2}}, {"num_cpus": 0.0}),  # its workers reserve the GPUs
        ({"model": {"device": "cuda"}, "server": {"replica_cpus": 1, "replica_gpus": 0}}, {"num_cpus": 1.0}),
        ({"server": {"replica_cpus": 2, "replica_gpus": 0.5}}, {"num_cpus": 2.0, "num_gpus": 0.5}),
    ],
)
def test_replica_resources_follow_the_config(sections, expected):
    assert replica_actor_options(config(**sections)) == expected


def test_negative_resources_are_rejected():
    with pytest.raises(ValueError):
        config(server={"replica_cpus": -1})


def test_flags_set_replica_resources_and_cluster_autoscaling():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ["parallel", "server"])
    args = parser.parse_args(["--replica-cpus", "2", "--replica-gpus", "1", "--cluster-autoscales"])
    parsed = config_from_args(args, parser)
    assert (parsed.server.replica_cpus, parsed.server.replica_gpus, parsed.parallel.cluster_autoscales) == (2.0, 1.0, True)
    assert config_from_args(parser.parse_args([]), parser).parallel.cluster_autoscales is False
