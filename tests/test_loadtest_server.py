"""`llmcluster bench` end to end: a short sweep against the real Ray Serve application with the default model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port
from serve_app import served

from serving.cli import main
from serving.config import LLMConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(default_model) -> Iterator[str]:
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(default_model), "max_model_len": 512},
            "engine": {"kv_cache_memory_gb": 0.25, "max_num_seqs": 8},
            "server": {"port": free_port()},
        }
    )
    with served(config) as url:
        yield url


def test_sweep_measures_the_server_and_compares(server: str, default_model: Path, tmp_path: Path, capsys):
    out = tmp_path / "ours.json"
    args = ["bench", "sweep", "--url", server, "--tokenizer", str(default_model), "--concurrency", "1", "4"]
    args += ["--num-requests", "4", "--input-len", "16", "--output-len", "8", "--goodput", "ttft:60000"]
    args += ["--setting", "dtype=float32", "--out", str(out), "--plots", str(tmp_path / "ours"), "--quiet"]
    assert main(args) == 0
    document = json.loads(out.read_text())
    assert document["settings"]["model"] == "SmolLM2-135M-Instruct"
    assert document["settings"]["server"] == {"dtype": "float32"}
    for point in document["points"]:
        s = point["summary"]
        assert (s["completed"], s["failed"]) == (4, 0)
        assert s["total_input_tokens"] == 4 * 16
        assert s["total_output_tokens"] == 4 * 8  # ignore_eos: exactly max_tokens each
        assert 0 < s["ttft_ms"]["median"] <= s["e2el_ms"]["median"]
        assert s["goodput"] == pytest.approx(s["request_throughput"])
        assert len(point["ttft_s"]) == 4 and len(point["itl_s"]) <= 4 * 7
    assert (tmp_path / "ours_latency_throughput.png").exists() and (tmp_path / "ours_distributions.png").exists()
    assert "c=4" in capsys.readouterr().out

    assert main(["bench", "compare", str(out), str(out), "--plot", str(tmp_path / "cmp.png")]) == 0
    assert "1.00x" in capsys.readouterr().out
    assert (tmp_path / "cmp.png").exists()


def test_chat_endpoint_and_rate_shape(server: str, default_model: Path, tmp_path: Path):
    out = tmp_path / "chat.json"
    args = ["bench", "run", "--url", server, "--tokenizer", str(default_model), "--endpoint", "chat"]
    args += ["--request-rate", "inf", "--num-requests", "3", "--output-len", "4", "--warmup", "0", "--out", str(out)]
    assert main(args + ["--quiet"]) == 0
    summary = json.loads(out.read_text())["points"][0]["summary"]
    assert (summary["completed"], summary["total_output_tokens"]) == (3, 12)
