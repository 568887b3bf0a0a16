"""The transformers baseline of the peer comparison: `generate` behind a minimal OpenAI completions API.

    python -m benchmarks.peers.hf_server --model FOLDER --port 8001 --threads 2 --max-batch 32

Batching is static: a batch starts --batch-window-ms after its first request, with every request
waiting then (up to --max-batch), left-padded, and runs `generate` (greedy, float32) until its
longest request is done; requests arriving meanwhile wait for the next batch. A streamer hands each step's tokens to the waiting HTTP streams. Only
POST /v1/completions (text prompts, max_tokens, ignore_eos, stream, stream_options) and
GET /v1/models; sampling fields other than max_tokens are ignored (always greedy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


@dataclass
class _Job:
    prompt: str
    max_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # one item per generated token, then None at the end
    generated: list[int] = field(default_factory=list)
    done: bool = False

    def emit(self, item: list[int] | None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class _BatchStreamer(BaseStreamer, StoppingCriteria):
    """Receives each step's tokens for the batch, ends each job at its own length or EOS, and stops
    `generate` once every job has ended."""

    def __init__(self, jobs: list[_Job], eos_ids: set[int]) -> None:
        self.jobs, self.eos_ids, self.prompt_seen = jobs, eos_ids, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if job.done:
                continue
            job.generated.append(token)
            job.done = len(job.generated) >= job.max_tokens or (not job.ignore_eos and token in self.eos_ids)
            job.emit([token])
            if job.done:
                job.emit(None)

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                job.done = True
                job.emit(None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), all(job.done for job in self.jobs), dtype=torch.bool)


class Generator:
    """One thread runs batches of the jobs waiting in `pending`."""

    def __init__(self, folder: Path, max_batch: int, window_s: float) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.max_batch, self.window_s = max_batch, window_s
        self.pending: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            jobs = [self.pending.get()]
            time.sleep(self.window_s)  # requests sent together arrive a few milliseconds apart
            while len(jobs) < self.max_batch and not self.pending.empty():
                jobs.append(self.pending.get_nowait())
            inputs = self.tokenizer([job.prompt for job in jobs], return_tensors="pt", padding=True)
            streamer = _BatchStreamer(jobs, self.eos_ids)
            with torch.inference_mode():
                self.model.generate(
                    **inputs,
                    max_new_tokens=max(job.max_tokens for job in jobs),
                    do_sample=False,
                    eos_token_id=None,  # each job ends at its own EOS in the streamer; the batch runs on
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer,
                    stopping_criteria=[streamer],
                )
            streamer.end()


def build_app(generator: Generator, model_name: str) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "hf"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body.get("prompt"), str):
            return web.json_response({"error": {"message": "prompt must be a string", "type": "invalid_request"}}, status=400)
        job = _Job(
            body["prompt"],
            int(body.get("max_tokens") or 16),
            bool(body.get("ignore_eos")),
            asyncio.get_running_loop(),
            asyncio.Queue(),
        )
        generator.pending.put(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_len = len(generator.tokenizer(job.prompt).input_ids)

        def chunk(text: str, finish: str | None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [choice],
            }

        def usage() -> dict:
            return {
                "prompt_tokens": prompt_len,
                "completion_tokens": len(job.generated),
                "total_tokens": prompt_len + len(job.generated),
            }

        decoded = ""
        if not body.get("stream"):
            while await job.out.get() is not None:
                pass
            text = generator.tokenizer.decode(job.generated, skip_special_tokens=True)
            return web.json_response(chunk(text, _finish_reason(job)) | {"usage": usage()})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        while await job.out.get() is not None:
            text = generator.tokenizer.decode(job.generated, skip_special_tokens=True)
            delta, decoded = text[len(decoded) :], text
            await response.write(f"data: {json.dumps(chunk(delta, None))}\n\n".encode())
        await response.write(f"data: {json.dumps(chunk('', _finish_reason(job)))}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(f"data: {json.dumps(chunk('', None) | {'choices': [], 'usage': usage()})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions)])
    return app


def _finish_reason(job: _Job) -> str:
    return "length" if len(job.generated) >= job.max_tokens else "stop"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--served-model-name", help="the name /v1/models lists (default: the folder's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32, help="most requests in one batch (default: %(default)s)")
    parser.add_argument("--batch-window-ms", type=float, default=50, help="wait this long for more requests (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = Generator(args.model, args.max_batch, args.batch_window_ms / 1000)
    web.run_app(build_app(generator, args.served_model_name or args.model.name), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
