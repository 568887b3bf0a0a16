"""llmcluster: serve an LLM behind an OpenAI-compatible API on Ray, and use it from the shell.

  llmcluster serve                         local Ray cluster + the embedded default model on http://127.0.0.1:8000
  llmcluster serve --model PATH            a Hugging Face-format model folder (or a Hub repo id) instead
  llmcluster serve --address HOST:PORT     deploy onto an existing Ray cluster instead of a local one
  llmcluster generate "Once upon a time"   one-shot generation in this process, streamed to the terminal
  llmcluster chat                          interactive chat with a running server
  llmcluster status                        the application, its replicas and their engines
  llmcluster shutdown                      stop what `serve` started
  llmcluster status --kubernetes           the Helm chart's RayService, its pods and Serve applications
  llmcluster preflight --model PATH        can the Kubernetes cluster run the chart with this model and layout?
  llmcluster bench run|sweep|compare       load-test an OpenAI-compatible server, compare results

Run `llmcluster COMMAND --help` for the flags of each command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.request
from typing import Any

import psutil

from serving.config import ServerConfig
from serving.config_flags import add_config_flags, config_from_args
from serving.engine.sampling_params import SamplingParams
from serving.errors import LLMClusterError
from serving.kubernetes_cli import add_kubernetes_status_flags, add_preflight_command, kubernetes_status
from serving.models.source import cache_root

_SAMPLING_DEFAULTS = vars(SamplingParams())
_SAMPLING_FLAGS: dict[str, tuple[type, str]] = {
    "max_tokens": (int, "most tokens to generate"),
    "temperature": (float, "sampling temperature; 0 is greedy"),
    "top_p": (float, "sample from the smallest set of tokens with this much probability"),
    "top_k": (int, "sample from the k most likely tokens; 0 for all"),
    "seed": (int, "seed for reproducible sampling"),
    "stop": (str, "a string that ends the output; repeat the flag for several"),
}
_DEFAULT_SERVER = ServerConfig()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines are for operators, not here
    try:
        return args.run(args, args.parser)
    except (LLMClusterError, RuntimeError, TimeoutError) as error:
        print(f"llmcluster {args.command}: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, run: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=f"{summary}.\n\n{description}", formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(run=run, parser=sub)
        return sub

    serve = command(
        "serve", "Deploy the OpenAI-compatible API on Ray and wait until it answers",
        "Without --address, starts a local Ray cluster in the background (bound to 127.0.0.1, with token\n"
        "authentication) that keeps running after this command returns; `llmcluster shutdown` stops it.",
        _serve,
    )  # fmt: skip
    add_config_flags(serve, ["model", "engine", "parallel", "server"])
    ray_options = serve.add_argument_group("Ray cluster options")
    ray_options.add_argument("--address", help="join the Ray cluster at this address (host:port, or ray://...) instead of starting one")
    ray_options.add_argument("--ray-port", type=int, help="GCS port of a local cluster (default: Ray's, 6379)")
    ray_options.add_argument("--dashboard-port", type=int, help="dashboard port of a local cluster (default: Ray's, 8265)")
    ray_options.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the API to answer (default: %(default)s)")
    _add_ray_auth_flag(ray_options)

    generate = command(
        "generate", "Generate a completion of PROMPT in this process and stream it to stdout",
        "Loads the model here (no Ray, no server); handy for trying a model folder.", _generate,
    )  # fmt: skip
    generate.add_argument("prompt", help="the text to complete")
    generate.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the model's chat template")
    _add_sampling_flags(generate, _SAMPLING_FLAGS)
    add_config_flags(generate, ["model", "engine"])

    chat = command("chat", "Chat with a running server in the terminal", "Type a message and Enter; /exit or Ctrl-D ends.", _chat)
    chat.add_argument("--url", default=_DEFAULT_SERVER.url, help=f"the server (default: {_DEFAULT_SERVER.url})")
    chat.add_argument("--model", help="model name (default: the first the server lists)")
    chat.add_argument("--system", help="a system message to start the conversation with")
    _add_sampling_flags(chat, {k: _SAMPLING_FLAGS[k] for k in ("max_tokens", "temperature", "top_p", "seed")})

    for name, summary, description, run in (
        ("status", "Show the application, its replicas and their engines", "", _status),
        (
            "shutdown",
            "Stop what `serve` started",
            "On the local cluster: stops the whole cluster. With --address: deletes the application only.",
            _shutdown,
        ),
    ):
        sub = command(name, summary, description, run)
        sub.add_argument("--address", help="the Ray cluster (default: the local one `serve` started)")
        _add_ray_auth_flag(sub)
        app_name = ServerConfig.model_fields["app_name"]
        sub.add_argument("--app-name", default=app_name.default, help=f"{app_name.description} (default: {app_name.default})")
        if name == "status":
            add_kubernetes_status_flags(sub)
    add_preflight_command(commands)
    from serving.loadtest.cli import add_bench_command  # argparse only: the load tester loads when it runs

    add_bench_command(commands)
    return parser


def _add_ray_auth_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--ray-auth-token-file", metavar="FILE",
        help="with --address: join a cluster that uses Ray's token authentication, with the token in FILE "
        "(or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)",
    )  # fmt: skip


def _add_sampling_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[type, str]]) -> None:
    group = parser.add_argument_group("sampling options")
    for name, (kind, help_text) in flags.items():
        default = _SAMPLING_DEFAULTS[name]
        action = "append" if name == "stop" else "store"
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"sampling.{name}", type=kind, action=action, metavar=name.upper(),
                           default=argparse.SUPPRESS, help=f"{help_text} (default: {default or 'none'})")  # fmt: skip


def _sampling_args(args: argparse.Namespace) -> dict[str, Any]:
    return {dest.split(".", 1)[1]: value for dest, value in vars(args).items() if dest.startswith("sampling.")}


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cluster import local
    from serving.models.source import resolve_model
    from serving.server.deploy_checks import check_model_layout
    from serving.server.deployments import deploy

    config = config_from_args(args, parser)
    if args.address:
        local.connect(args.address, token_auth=False, token_file=args.ray_auth_token_file)
        where = f"the Ray cluster at {args.address}"
    else:
        # fail fast on a bad source or a layout the model cannot take; the default model is converted here, once
        check_model_layout(config, resolve_model(config.model.source))
        token, created = local.ensure_auth_token()
        if created:
            print(f"Created the local Ray cluster's authentication token in {token} (readable by you alone).", file=sys.stderr)
        cluster = local.find(cache_root()) or local.start(cache_root(), args.ray_port, args.dashboard_port)
        local.connect(cluster.address, token_auth=True)
        where = f"a local Ray cluster at {cluster.address} (dashboard {cluster.dashboard_url})"
    url = deploy(config, timeout_s=args.timeout)
    model = _get_json(f"{url}/v1/models")["data"][0]["id"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = json.dumps({"model": model, "messages": question, "max_tokens": 64, "temperature": 0})
    since_start = time.time() - psutil.Process().create_time()
    print(f"Serving {model} at {url}/v1 on {where}; ready {since_start:.1f} s after this command started.")
    print(f"Try it:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    print("Stop it: llmcluster shutdown")
    return 0


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from serving.engine.llm_engine import LLMEngine
    from serving.server.openai_api import chat_prompt_ids

    config = config_from_args(args, parser)
    try:
        params = SamplingParams(**_sampling_args(args))
    except LLMClusterError as error:
        parser.error(str(error))
    engine = LLMEngine(config)
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    engine.add_request("generate", prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            print(output.outputs[0].text_delta, end="", flush=True)
    print()
    return 0


def _chat(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=f"{args.url}/v1", api_key="none", max_retries=0)
    sampling = _sampling_args(args)
    try:
        model = args.model or client.models.list().data[0].id
    except OpenAIError as error:
        raise RuntimeError(f"no server answers at {args.url}: {error}") from error
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        print("assistant> ", end="", flush=True)
        try:
            for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **sampling):
                if chunk.choices and chunk.choices[0].delta.content:
                    reply.append(chunk.choices[0].delta.content)
                    print(reply[-1], end="", flush=True)
        except OpenAIError as error:
            print(f"\n[error: {error}]")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.kubernetes:
        return kubernetes_status(args)
    from serving.server.status import status_report

    where = _connect(args)
    found, report = status_report(args.app_name)
    print(f"On {where}:\n{report}")
    return 0 if found else 1


def _shutdown(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cluster import local

    if args.address:
        from ray import serve

        local.connect(args.address, token_auth=False, token_file=args.ray_auth_token_file)
        serve.delete(args.app_name)
        print(f"Deleted application {args.app_name!r} from the Ray cluster at {args.address}.")
    elif local.stop(cache_root()):
        print("Stopped the local Ray cluster and everything on it.")
    else:
        print("No local Ray cluster is running.")
    return 0


def _connect(args: argparse.Namespace) -> str:
    """Connect to --address or to the local cluster; returns a description of it."""
    from cluster import local

    if args.address:
        local.connect(args.address, token_auth=False, token_file=args.ray_auth_token_file)
        return f"the Ray cluster at {args.address}"
    cluster = local.find(cache_root())
    if cluster is None:
        raise RuntimeError("no local Ray cluster is running (start one with `llmcluster serve`, or pass --address)")
    local.connect(cluster.address, token_auth=True)
    return f"the local Ray cluster at {cluster.address}"


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


if __name__ == "__main__":
    sys.exit(main())
