"""The load tester's arithmetic, timing and load shapes, against a scripted SSE server with known timings."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from ports import free_port

from serving.loadtest.client import HTTPTarget, RequestResult
from serving.loadtest.compare import compare_table
from serving.loadtest.load import LoadPoint, LoadRun, run_load
from serving.loadtest.metrics import summarize
from serving.loadtest.plots import plot_comparison, plot_result
from serving.loadtest.report import load_result, point_record, result_document, summary_table, write_result
from serving.loadtest.workloads import RequestSpec, file_requests, random_requests, shared_prefix_requests
from serving.tokenizer import Tokenizer

# metric arithmetic on hand-timed requests


def timed(chunk_times: list[float], end: float, output_len: int, start: float = 10.0) -> RequestResult:
    return RequestResult(prompt_len=16, start=start, end=start + end, chunk_times=chunk_times, output_len=output_len)


def test_metrics_follow_vllms_definitions():
    a = timed([0.1, 0.15, 0.25, 0.3], end=0.3, output_len=4)
    b = timed([0.2, 0.4], end=0.5, output_len=2)
    failed = RequestResult(prompt_len=16, start=10.0, end=10.1, error="http_503")
    s = summarize([a, b, failed], duration_s=1.0)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"http_503": 1})
    assert s["ttft_ms"] == pytest.approx({"mean": 150.0, "median": 150.0, "p90": 190.0, "p99": 199.0})
    # TPOT leaves out the first token: (0.3 - 0.1) / 3 and (0.5 - 0.2) / 1
    assert s["tpot_ms"]["mean"] == pytest.approx((200.0 / 3 + 300.0) / 2)
    # ITL pools every gap of every request: 50, 100, 50 from a and 200 from b
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["median"] == pytest.approx(75.0)
    assert s["itl_ms"]["p99"] == pytest.approx(100.0 + 0.97 * 100.0)
    assert s["e2el_ms"]["median"] == pytest.approx(400.0)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_throughput"] == pytest.approx(6.0)
    assert s["total_token_throughput"] == pytest.approx(38.0)


def test_goodput_counts_requests_within_every_limit():
    a = timed([0.1, 0.15, 0.25, 0.3], end=0.3, output_len=4)  # TTFT 100 ms, TPOT 66.7 ms
    b = timed([0.2, 0.4], end=0.5, output_len=2)  # TTFT 200 ms, TPOT 300 ms
    single = timed([0.05], end=0.05, output_len=1)  # no TPOT: only its TTFT is judged
    results = [a, b, single]
    assert summarize(results, 2.0, {"ttft": 150})["goodput"] == pytest.approx(1.0)
    assert summarize(results, 2.0, {"tpot": 100})["goodput"] == pytest.approx(1.0)
    assert summarize(results, 2.0, {"ttft": 150, "e2el": 200})["goodput"] == pytest.approx(0.5)
    assert "goodput" not in summarize(results, 2.0)
    assert summarize(results, 2.0)["tpot_ms"]["median"] == pytest.approx((200.0 / 3 + 300.0) / 2)


def test_a_run_with_no_successes_reports_no_latencies():
    s = summarize([RequestResult(prompt_len=4, start=0.0, end=1.0, error="timeout")], 1.0)
    assert s["ttft_ms"] == {"mean": None, "median": None, "p90": None, "p99": None}
    assert s["output_throughput"] == 0.0


# a scripted server: chunks at known delays


class ScriptedServer:
    """Streams `len(delays)` one-token chunks, waiting delays[i] seconds before chunk i; records what it saw."""

    def __init__(self, delays: list[float], usage: bool = True) -> None:
        self.delays, self.usage = delays, usage
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.fail_with: int | None = None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.fail_with:
            return web.json_response({"error": {"message": "busy"}}, status=self.fail_with)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i, delay in enumerate(self.delays):
                await asyncio.sleep(delay)
                await response.write(f"data: {json.dumps({'choices': [{'index': 0, 'text': f' w{i}'}]})}\n\n".encode())
            if self.usage:
                usage = {
                    "prompt_tokens": 3,
                    "completion_tokens": len(self.delays),
                    "total_tokens": 3 + len(self.delays),
                }
                await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        finally:
            self.in_flight -= 1

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        app = web.Application()
        app.add_routes([web.post("/v1/completions", self.completions)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


SPEC = RequestSpec(" a b c", 3, 4)


def test_http_target_times_each_chunk_of_the_stream():
    server = ScriptedServer([0.3, 0.1, 0.1, 0.2])

    async def scenario() -> RequestResult:
        async with server.serving() as url:
            target = HTTPTarget(url, "m", api_key="secret", extra_body={"top_k": 5})
            try:
                return await target.send(SPEC)
            finally:
                await target.close()

    result = asyncio.run(scenario())
    assert result.ok and result.output_len == 4
    assert len(result.chunk_times) == 4
    gaps = [b - a for a, b in zip([0.0, *result.chunk_times], result.chunk_times)]
    for gap, delay in zip(gaps, server.delays):  # sleeps set lower bounds; a loaded machine may add to them
        assert delay - 0.01 <= gap < delay + 0.5
    assert result.end - result.start >= result.chunk_times[-1]
    body = server.bodies[0]
    assert body["prompt"] == " a b c" and body["max_tokens"] == 4 and body["stream"] is True
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["top_k"] == 5
    assert body["stream_options"] == {"include_usage": True}
    assert server.headers[0]["Authorization"] == "Bearer secret"


def test_a_point_reports_the_load_generators_own_cpu_time():
    """Events split across reads, several in one read, and CRLF line ends (sse-starlette's) all parse; the point's
    summary holds the client's CPU time in all and per output token."""
    server = ScriptedServer([0.0] * 40)

    async def scenario() -> LoadRun:
        async with server.serving() as url:
            target = HTTPTarget(url, "m")
            try:
                return await run_load(target, [SPEC], LoadPoint(concurrency=2), num_requests=4, progress=False)
            finally:
                await target.close()

    run = asyncio.run(scenario())
    assert all(r.ok and r.output_len == 40 and len(r.chunk_times) == 40 for r in run.results)
    summary = point_record(LoadPoint(concurrency=2), run, None)["summary"]
    assert summary["client_cpu_s"] > 0
    assert summary["client_cpu_us_per_output_token"] == pytest.approx(summary["client_cpu_s"] / 160 * 1e6)
    assert "client CPU s" in summary_table([{"load": {"label": "c=2"}, "summary": summary}])


def test_crlf_events_split_across_reads_are_parsed():
    events = [f"data: {json.dumps({'choices': [{'index': 0, 'text': f' w{i}'}]})}\r\n\r\n".encode() for i in range(3)]
    stream = b"".join(events) + b"data: [DONE]\r\n\r\n"

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(stream), 7):  # mid-line and mid-CRLF cuts
            await response.write(stream[i : i + 7])
            await asyncio.sleep(0.001)
        return response

    async def scenario() -> RequestResult:
        app = web.Application()
        app.add_routes([web.post("/v1/completions", chunked)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        target = HTTPTarget(f"http://127.0.0.1:{port}", "m")
        try:
            return await target.send(SPEC)
        finally:
            await target.close()
            await runner.cleanup()

    result = asyncio.run(scenario())
    assert result.ok and len(result.chunk_times) == 3 and result.output_len == 3


def test_without_usage_output_tokens_are_counted_with_the_tokenizer(default_model):
    server = ScriptedServer([0.0, 0.0, 0.0], usage=False)
    tokenizer = Tokenizer.from_folder(default_model)

    async def scenario() -> RequestResult:
        async with server.serving() as url:
            target = HTTPTarget(url, "m", tokenizer=tokenizer)
            try:
                return await target.send(SPEC)
            finally:
                await target.close()

    result = asyncio.run(scenario())
    assert result.output_len == len(tokenizer.encode(" w0 w1 w2", add_special_tokens=False))


def test_errors_are_counted_by_kind():
    server = ScriptedServer([0.0])
    server.fail_with = 503

    async def scenario() -> list[RequestResult]:
        async with server.serving() as url:
            target = HTTPTarget(url, "m")
            try:
                results = [await target.send(SPEC)]
                gone = HTTPTarget(f"http://127.0.0.1:{free_port()}", "m")
                results.append(await gone.send(SPEC))
                await gone.close()
                return results
            finally:
                await target.close()

    busy, refused = asyncio.run(scenario())
    assert (busy.error, refused.error) == ("http_503", "connection")
    assert summarize([busy, refused], 1.0)["errors"] == {"http_503": 1, "connection": 1}


# load shapes


def run_against(server: ScriptedServer, point: LoadPoint, count: int | None, duration: float | None = None, warmup: int = 0):
    async def scenario():
        async with server.serving() as url:
            target = HTTPTarget(url, "m")
            try:
                return await run_load(target, [SPEC], point, count, duration, warmup, progress=False)
            finally:
                await target.close()

    return asyncio.run(scenario())


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight():
    server = ScriptedServer([0.05, 0.05])
    run = run_against(server, LoadPoint(concurrency=3), count=9, warmup=2)
    assert len(run.results) == 9 and all(r.ok for r in run.results)
    assert len(server.bodies) == 11  # warm-up requests are sent but not counted
    assert server.max_in_flight == 3
    assert run.duration_s >= 3 * 0.1  # three waves of 0.1 s


def test_open_loop_at_infinite_rate_sends_everything_at_once_up_to_the_cap():
    server = ScriptedServer([0.1])
    run_against(server, LoadPoint(request_rate=math.inf), count=6)
    assert server.max_in_flight == 6
    capped = ScriptedServer([0.1])
    run_against(capped, LoadPoint(request_rate=math.inf, max_concurrency=2), count=6)
    assert capped.max_in_flight == 2


def test_open_loop_spaces_arrivals_by_the_rate_and_stops_at_the_duration():
    server = ScriptedServer([0.0])
    run = run_against(server, LoadPoint(request_rate=20.0, burstiness=4.0), count=None, duration=1.0)
    # gamma gaps with mean 50 ms (shape 4: fairly regular) over 1 s: about 20 arrivals
    assert 8 <= len(run.results) <= 30
    starts = sorted(r.start for r in run.results)
    assert starts[-1] - starts[0] < 1.0


def test_load_points_are_validated():
    with pytest.raises(ValueError):
        LoadPoint()
    with pytest.raises(ValueError):
        LoadPoint(concurrency=2, request_rate=1.0)
    assert LoadPoint(request_rate=2.0, burstiness=0.5).label == "rate=2,b=0.5"


# workloads


def test_random_prompts_have_exact_token_lengths(default_model):
    tokenizer = Tokenizer.from_folder(default_model)
    specs = random_requests(tokenizer, 8, 16, 128, seed=1)
    assert len({s.prompt for s in specs}) == 8
    assert all(len(tokenizer.encode(s.prompt, add_special_tokens=False)) == s.prompt_len == 16 for s in specs)
    assert specs == random_requests(tokenizer, 8, 16, 128, seed=1)
    shared = shared_prefix_requests(tokenizer, 4, prefix_len=64, input_len=8, output_len=4, num_prefixes=2)
    assert all(s.prompt_len == 72 for s in shared)
    ids = [tokenizer.encode(s.prompt, add_special_tokens=False) for s in shared]
    assert ids[0][:64] == ids[2][:64] != ids[1][:64] and ids[0][64:] != ids[2][64:]


def test_prompt_file_workload(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there"}\n\n{"prompt": "Bye", "output_len": 5}\n')
    assert file_requests(path, 32) == [RequestSpec("Hello there", 0, 32), RequestSpec("Bye", 0, 5)]
    path.write_text('["not an object"]\n')
    with pytest.raises(TypeError):
        file_requests(path, 32)


# results, plots and comparison


@pytest.fixture
def two_results(tmp_path: Path) -> Iterator[list[Path]]:
    paths = []
    for label, scale in (("ours", 1.0), ("peer", 2.0)):
        records = []
        for concurrency in (1, 4):
            run_results = [timed([0.1 * scale, 0.2 * scale], end=0.2 * scale, output_len=2) for _ in range(concurrency)]
            records.append(point_record(LoadPoint(concurrency=concurrency), LoadRun(run_results, scale), {"ttft": 150}))
        path = tmp_path / f"{label}.json"
        write_result(result_document(label, {"model": "m"}, records), path)
        paths.append(path)
    yield paths


def test_results_round_trip_and_render(two_results: list[Path], tmp_path: Path):
    ours = load_result(two_results[0])
    table = summary_table(ours["points"])
    assert "c=1" in table and "c=4" in table and "goodput" in table
    assert ours["points"][1]["ttft_s"] == [0.1] * 4 and ours["points"][1]["itl_s"] == pytest.approx([0.1] * 4)
    files = plot_result(ours, tmp_path / "plots" / "ours")
    assert [f.name for f in files] == ["ours_distributions.png", "ours_latency_throughput.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_compare_puts_files_side_by_side_with_ratios(two_results: list[Path], tmp_path: Path):
    documents = [load_result(p) for p in two_results]
    table = compare_table(documents)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [row[0].strip("| ") for row in rows] == ["c=1", "c=4"]
    # c=4: ours 8 tok/s, peer 4 tok/s (0.50x); TTFT 100 vs 200 ms (2.00x); ITL 100 vs 200 ms (2.00x)
    assert rows[1][1:4] == ["8.0", "4.0", "0.50x"]
    assert rows[1][4:7] == ["100.0", "200.0", "2.00x"]
    assert plot_comparison(documents, tmp_path / "cmp.png").stat().st_size > 0
    with pytest.raises(ValueError):
        compare_table(documents[:1])
