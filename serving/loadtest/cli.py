"""`llmcluster bench`: load-test any OpenAI-compatible endpoint and compare result files.

  llmcluster bench run --url http://127.0.0.1:8000 --tokenizer MODEL_FOLDER --concurrency 8
  llmcluster bench sweep --url ... --tokenizer MODEL_FOLDER --concurrency 1 8 32 --out sweep.json --plots plots/sweep
  llmcluster bench sweep --url ... --tokenizer MODEL_FOLDER --request-rate 1 2 4 --burstiness 0.5
  llmcluster bench compare ours.json vllm.json --plot compare.png

Also `python -m serving.loadtest ...`. This module only defines the command line (argparse);
the tool itself is imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

SLO_NAMES = ("ttft", "tpot", "e2el")


def add_bench_command(commands: Any) -> None:
    """Register `bench` and its subcommands on an argparse subparsers object."""
    bench = commands.add_parser("bench", help="Load-test an OpenAI-compatible endpoint; compare results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    for name, many, summary in (
        ("run", False, "One load point: a concurrency or a request rate"),
        ("sweep", True, "Several load points, one after the other, into one result file"),
    ):
        parser = sub.add_parser(name, help=summary, description=summary)
        _add_run_args(parser, many)
        parser.set_defaults(run=_run, parser=parser)
    compare = sub.add_parser("compare", help="Side-by-side table (with ratios) and plot of result files")
    compare.add_argument("results", nargs="+", type=Path, help="result files; the first is the baseline of the ratios")
    compare.add_argument("--plot", type=Path, help="write the comparison plot (PNG) here")
    compare.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    compare.set_defaults(run=_compare, parser=compare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.loadtest")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args, args.parser)


def _add_run_args(parser: argparse.ArgumentParser, many: bool) -> None:
    nargs = "+" if many else None
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, without /v1 (default: %(default)s)")
    target.add_argument("--model", help="model name to request (default: the first the server lists)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)")
    target.add_argument("--endpoint", choices=["completions", "chat"], default="completions", help="(default: %(default)s)")
    target.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos")
    target.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every request body")
    target.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    work = parser.add_argument_group("workload")
    work.add_argument("--dataset", choices=["random", "file", "prefix"], default="random", help="(default: %(default)s)")
    work.add_argument("--tokenizer", type=Path, help="the served model's folder (tokenizer.json): exact prompt lengths")
    work.add_argument("--input-len", type=int, default=16, help="prompt tokens; unique tokens for prefix (default: %(default)s)")
    work.add_argument("--output-len", type=int, default=128, help="max_tokens (default: %(default)s)")
    work.add_argument("--prefix-len", type=int, default=256, help="prefix dataset: shared tokens (default: %(default)s)")
    work.add_argument("--num-prefixes", type=int, default=1, help="prefix dataset: distinct prefixes (default: %(default)s)")
    work.add_argument("--prompt-file", type=Path, help='file dataset: JSONL lines {"prompt": ..., "output_len": ...}')
    work.add_argument("--num-prompts", type=int, help="distinct prompts to build (default: the request count, or 256)")
    load = parser.add_argument_group("load (one of --concurrency or --request-rate)")
    shape = load.add_mutually_exclusive_group(required=True)
    shape.add_argument("--concurrency", type=int, nargs=nargs, help="closed loop: requests in flight")
    shape.add_argument("--request-rate", type=float, nargs=nargs, help="open loop: requests per second (inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="open loop gap shape: 1 Poisson, <1 burstier (default: 1)")
    load.add_argument("--max-concurrency", type=int, help="open loop: most requests in flight")
    load.add_argument("--num-requests", type=int, default=64, help="requests per load point; 0: unbounded (default: %(default)s)")
    load.add_argument("--duration", type=float, help="stop sending after this many seconds per load point")
    load.add_argument("--warmup", type=int, default=1, help="uncounted requests before each point (default: %(default)s)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS", help="limits for goodput, e.g. ttft:500 tpot:50")
    out = parser.add_argument_group("output")
    out.add_argument("--label", help="name of this run in tables and plots (default: the model name)")
    out.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE", help="a server setting to record")
    out.add_argument("--out", type=Path, help="write the JSON result here")
    out.add_argument("--plots", type=Path, metavar="PREFIX", help="write PNG plots as PREFIX_*.png")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio

    from serving.loadtest.bench import RunSpec, WorkloadSpec
    from serving.loadtest.load import LoadPoint

    values = args.concurrency if args.concurrency is not None else args.request_rate
    values = values if isinstance(values, list) else [values]
    try:
        if args.concurrency is not None:
            points = [LoadPoint(concurrency=v) for v in values]
        else:
            points = [LoadPoint(request_rate=v, burstiness=args.burstiness, max_concurrency=args.max_concurrency) for v in values]
        slo = _parse_slo(args.goodput)
        settings = dict(_parse_setting(s) for s in args.setting)
    except ValueError as error:
        parser.error(str(error))
    num_requests = args.num_requests or None
    workload = WorkloadSpec(
        kind=args.dataset,
        num_prompts=args.num_prompts or num_requests or 256,
        input_len=args.input_len,
        output_len=args.output_len,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
        prompt_file=args.prompt_file,
        seed=args.seed,
    )
    spec = RunSpec(num_requests, args.duration, args.warmup, args.seed, slo, not args.quiet)
    return asyncio.run(_run_http(args, workload, points, spec, settings))


async def _run_http(args: argparse.Namespace, workload: Any, points: list, spec: Any, settings: dict[str, str]) -> int:
    from serving.loadtest.bench import run_points
    from serving.loadtest.client import HTTPTarget, fetch_model
    from serving.loadtest.report import result_document
    from serving.tokenizer import Tokenizer

    model = args.model or await fetch_model(args.url, args.api_key)
    tokenizer = Tokenizer.from_folder(args.tokenizer) if args.tokenizer else None
    requests = workload.build(tokenizer)
    target = HTTPTarget(args.url, model, args.endpoint, args.api_key, args.ignore_eos, args.extra_body, tokenizer, args.timeout)
    try:
        records = await run_points(target, requests, points, spec)
    finally:
        await target.close()
    run_settings = {
        "url": args.url,
        "model": model,
        "endpoint": args.endpoint,
        "ignore_eos": args.ignore_eos,
        "extra_body": args.extra_body,
        "workload": workload.to_dict(),
        "num_requests": spec.num_requests,
        "duration_s": spec.duration_s,
        "warmup": spec.warmup,
        "server": settings,
    }
    document = result_document(args.label or model, run_settings, records)
    _present(document, args.out, args.plots)
    return 0 if all(r["summary"]["completed"] for r in records) else 1


def _present(document: dict[str, Any], out: Path | None, plots: Path | None) -> None:
    from serving.loadtest.report import summary_table, write_result

    print(summary_table(document["points"]))
    if out:
        write_result(document, out)
        print(f"result: {out}")
    if plots:
        from serving.loadtest.plots import plot_result

        for path in plot_result(document, plots):
            print(f"plot: {path}")


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from serving.loadtest.compare import compare_table
    from serving.loadtest.report import load_result

    if len(args.results) < 2:
        parser.error("compare needs two or more result files")
    documents = [load_result(path) for path in args.results]
    table = compare_table(documents)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.plot:
        from serving.loadtest.plots import plot_comparison

        print(f"plot: {plot_comparison(documents, args.plot)}")
    return 0


def _parse_slo(items: list[str]) -> dict[str, float]:
    slo = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in SLO_NAMES or not value:
            raise ValueError(f"--goodput takes NAME:MILLISECONDS with NAME one of {', '.join(SLO_NAMES)}; got {item!r}")
        slo[name] = float(value)
    return slo


def _parse_setting(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--setting takes KEY=VALUE; got {item!r}")
    return key, value
