"""The `llmcluster` command: help, flags generated from the config, `generate` on the tiny model, and
(slow) the whole local life cycle: serve, status, chat, shutdown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
from ports import free_port

from serving.cli import build_parser, main
from serving.config import EngineConfig
from serving.config_flags import config_from_args
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams

COMMANDS = ["serve", "generate", "chat", "status", "shutdown"]


def subcommand_parser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: llmcluster {command}" in capsys.readouterr().out
    for action in subcommand_parser(command)._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_console_script_is_installed():
    result = subprocess.run(["llmcluster", "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS)


def test_flags_override_the_config_file_and_keep_defaults(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  max_model_len: 512\nengine:\n  block_size: 8\nserver:\n  port: 9000\n")
    parser = subcommand_parser("serve")
    args = parser.parse_args(["--config", str(path), "--port", "9100", "--model", "/m", "--no-enable-prefix-caching", "--max-n", "4"])
    config = config_from_args(args, parser)
    assert (config.model.source, config.model.max_model_len, config.engine.block_size) == ("/m", 512, 8)
    assert (config.server.port, config.server.limits.max_n, config.engine.enable_prefix_caching) == (9100, 4, False)
    assert config.engine.max_num_seqs == EngineConfig().max_num_seqs


def test_invalid_flag_values_exit_with_the_flag_named(capsys):
    parser = subcommand_parser("serve")
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(parser.parse_args(["--port", "70000"]), parser)
    assert exit_info.value.code == 2 and "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the CPU attention kernel finds a token's block with a shift
        config_from_args(parser.parse_args(["--block-size", "12"]), parser)
    assert exit_info.value.code == 2 and "block_size must be a power of two" in capsys.readouterr().err


def test_generate_streams_what_the_engine_generates(tiny_model, capsys):
    engine_flags = ["--model", str(tiny_model), "--block-size", "4", "--kv-cache-memory-gb", "0.02"]
    assert main(["generate", "Hello there", "--max-tokens", "12", "--temperature", "0", *engine_flags]) == 0
    printed = capsys.readouterr().out
    llm = LLM(str(tiny_model), block_size=4, kv_cache_memory_gb=0.02)
    [expected] = llm.generate(["Hello there"], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    assert printed == expected.outputs[0].text + "\n"
    assert main(["generate", "Hi", "--chat", "--max-tokens", "3", "--seed", "1", *engine_flags]) == 0


def test_generate_rejects_bad_input(tiny_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "Hi", "--model", str(tiny_model), "--max-tokens", "-1"])
    assert exit_info.value.code == 2 and "max_tokens" in capsys.readouterr().err
    assert main(["generate", "", "--model", str(tiny_model), "--kv-cache-memory-gb", "0.02"]) == 1
    assert "empty" in capsys.readouterr().err


def llmcluster(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["llmcluster", *args], check=False, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_serve_status_chat_shutdown_on_a_local_cluster(tiny_model, tmp_path):
    home = tmp_path / "home"  # a machine that has never run Ray or this project: no token, no caches
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "XDG_CACHE_HOME"}
    env |= {"HOME": str(home), "LLM_CLUSTER_CACHE": str(tmp_path / "cache")}  # the local cluster's state goes to the cache
    port = free_port()
    serve_flags = ["--model", str(tiny_model), "--kv-cache-memory-gb", "0.05", "--port", str(port)]
    ray_flags = ["--ray-port", str(free_port()), "--dashboard-port", str(free_port())]
    started = time.monotonic()
    served = llmcluster("serve", *serve_flags, *ray_flags, env=env, timeout=300)
    ready_after = time.monotonic() - started
    try:
        assert served.returncode == 0, served.stderr
        assert f"http://127.0.0.1:{port}/v1" in served.stdout and "curl" in served.stdout
        assert f"authentication token in {home / '.ray' / 'auth_token'}" in served.stderr
        assert ready_after < 60, f"ready after {ready_after:.0f} s"
        state = json.loads((tmp_path / "cache" / "local-cluster.json").read_text())

        status = llmcluster("status", env=env)
        assert status.returncode == 0, status.stderr
        assert "RUNNING" in status.stdout and re.search(r"\w+ +tiny-llama +1×1 +0 +0 ", status.stdout)

        chat = llmcluster("chat", "--url", f"http://127.0.0.1:{port}", "--max-tokens", "4", env=env, stdin="Hi there\n/exit\n")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.count("assistant> ") == 1 and "[error" not in chat.stdout
    finally:
        stopped = llmcluster("shutdown", env=env)
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout
    assert not psutil.pid_exists(state["pid"]) or psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE
    assert "No local Ray cluster" in llmcluster("shutdown", env=env).stdout
    print(f"llmcluster serve was ready after {ready_after:.1f} s", file=sys.stderr)


def test_serve_refuses_a_layout_the_model_cannot_take_before_starting_anything(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_CLUSTER_CACHE", str(tmp_path))
    started = time.monotonic()
    assert main(["serve", "--model", str(tiny_model), "--tensor-parallel", "3"]) == 1
    assert "tensor parallel size 3 does not divide the model's 4 attention heads" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model), "--max-model-len", "4096"]) == 1
    assert "max_model_len 4096 exceeds the model's context length 512" in capsys.readouterr().err
    assert time.monotonic() - started < 10 and not (tmp_path / "local-cluster.json").exists()
