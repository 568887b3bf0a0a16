"""The one typed configuration object that flows from CLI flags, YAML and Helm values to workers.

Every default lives here and nowhere else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the KV cache budget when engine.kv_cache_memory_gb is unset (serving/engine/runner.py kv_cache_blocks)
CPU_KV_CACHE_GB = 2.0
CUDA_KV_CACHE_FRACTION = 0.9  # of the GPU memory free once the weights are loaded ...
CUDA_RESERVED_GB = 2.0  # ... less this much for activations and CUDA graphs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """What to serve and in which numeric format."""

    source: str = Field(
        "default",
        description="A Hugging Face-format folder, a Hub repo id, or 'default' for the embedded SmolLM2-135M-Instruct.",
    )
    served_name: str | None = Field(None, description="Name clients use in the API; defaults to the folder name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="'auto' is float32 on CPU and bfloat16 on CUDA.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when available.")
    quantization: Literal["none", "int8", "int4", "gguf", "fp8"] = Field(
        "none",
        description="Weight format: 'int8' (per output channel) and 'int4' (groups of 32, scale and min; inputs rounded "
        "to int8 per 32) are quantized at load time and run on the CPU kernels; 'gguf' serves a GGUF source (the default model's own Q4_1 file) in "
        "its own precision; 'fp8' (e4m3 weights with a scale per output channel, activations scaled per token) is "
        "quantized at load time, or read from an FP8 checkpoint, and runs on CUDA GPUs with FP8 units (compute capability 8.9+).",
    )
    max_model_len: int | None = Field(None, gt=0, description="Longest prompt + output in tokens; defaults to the model's context length.")
    tool_parser: Literal["auto", "none", "hermes", "llama3_json", "smollm2"] = Field(
        "auto",
        description="How tool calls are read from the model's output: 'hermes' (<tool_call> blocks, Qwen2.5), 'llama3_json' "
        "(Llama 3.1/3.2), 'smollm2' (Hermes blocks with the chat template this package ships); 'auto' picks from the chat template.",
    )


class EngineConfig(_Strict):
    """Paged KV cache and scheduler settings."""

    block_size: int = Field(16, gt=0, description="Tokens per KV cache block, a power of two.")
    kv_cache_memory_gb: float | None = Field(
        None,
        gt=0,
        description="KV cache budget in GiB; default: 2 GiB on CPU, on CUDA 90% of the memory free after "
        "loading the weights less 2 GiB for activations and CUDA graphs.",
    )
    max_num_seqs: int = Field(64, gt=0, description="Most sequences in the running batch.")
    max_num_batched_tokens: int = Field(2048, gt=0, description="Token budget of one engine step.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts over several steps.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs for decode (CUDA only).")
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch; default: torch's choice.")

    @model_validator(mode="after")
    def _budget_holds_a_block(self) -> EngineConfig:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (1, 2, 4, ... 16, 32 ...), not {self.block_size}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        return self


class ParallelConfig(_Strict):
    """How one replica's model is split over workers (Ray actors talking torch.distributed)."""

    tensor_parallel: int = Field(1, ge=1, description="Workers per pipeline stage, each holding a slice of every layer; kept on one node.")
    pipeline_parallel: int = Field(
        1, ge=1, description="Pipeline stages, each a run of consecutive layers; spread over nodes when there are several."
    )
    worker_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs each worker reserves in Ray when the model runs on CPUs (fractions allowed: 0.5 puts "
        "tensor_parallel 3 on two cores); workers on GPUs reserve one GPU each and no CPU.",
    )
    placement_timeout_s: float = Field(
        60.0, gt=0, description="How long to wait for the cluster to free room for the workers before giving up."
    )
    cluster_autoscales: bool = Field(
        False,
        description="The Ray cluster adds nodes on demand (Ray's autoscaler, KubeRay's too): replicas and workers the "
        "current nodes cannot hold are not refused before deploying, and workers wait up to placement_timeout_s for new nodes.",
    )
    backend: Literal["native", "deepspeed"] = Field(
        "native",
        description="native: this project's Llama-family model; deepspeed: any Hugging Face causal LM, "
        "split by DeepSpeed's automatic tensor parallelism (no pipeline stages).",
    )

    @model_validator(mode="after")
    def _deepspeed_has_no_stages(self) -> ParallelConfig:
        if self.backend == "deepspeed" and self.pipeline_parallel > 1:
            raise ValueError("the deepspeed backend splits layers by tensor parallelism only; use pipeline_parallel 1")
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


class LimitsConfig(_Strict):
    """Per-request limits the API enforces before any work is queued."""

    max_body_bytes: int = Field(2 * 2**20, gt=0, description="Largest request body in bytes; larger ones get 413.")
    max_n: int = Field(16, gt=0, description="Most completions (n) one request may ask for.")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Most tokens in one prompt; default: only the model's context length.")
    max_tokens: int | None = Field(
        None, gt=0, description="Most tokens one completion may generate; a request that leaves max_tokens out gets at most this many."
    )
    max_logprobs: int = Field(20, ge=0, description="Most alternatives per token a request may ask for (logprobs, top_logprobs).")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings in one request.")
    max_stop_length: int = Field(256, gt=0, description="Longest stop string in characters.")
    max_messages: int = Field(2048, gt=0, description="Most messages in one chat request.")
    max_grammar_bytes: int = Field(
        32768, gt=0, description="Largest output constraint (JSON schema, regex, choices or grammar) in bytes of UTF-8 text."
    )
    max_tool_calls: int = Field(
        4,
        gt=0,
        description="Most tool calls one choice may make where a grammar enforces them and parallel_tool_calls allows "
        "several (a small model given the room repeats its call until max_tokens).",
    )


class AuthConfig(_Strict):
    """API keys (Authorization: Bearer) and per-key rate limits; GET /health never needs a key."""

    require_api_key: bool = Field(
        False, description="Require an API key; keys come from $LLMCLUSTER_API_KEYS (comma-separated) and api_keys_file."
    )
    api_keys_file: str | None = Field(None, description="A file with one API key per line (# starts a comment).")
    requests_per_minute: int | None = Field(None, gt=0, description="Requests each key may make per minute, per API replica.")
    tokens_per_minute: int | None = Field(
        None, gt=0, description="Prompt plus generated tokens each key may use per minute, per API replica."
    )

    @model_validator(mode="after")
    def _limits_need_keys(self) -> AuthConfig:
        if not self.require_api_key and (self.requests_per_minute or self.tokens_per_minute):
            raise ValueError("rate limits are per API key: set require_api_key as well")
        return self


class AutoscalingConfig(_Strict):
    """How LLM replicas scale between min_replicas and max_replicas: on waiting requests, KV cache usage
    and time to first token per replica, ahead of the load trend by the measured replica start-up time."""

    target_waiting_requests: float = Field(2.0, gt=0, description="Waiting requests per replica to aim for; more add replicas.")
    target_kv_cache_usage: float = Field(0.8, gt=0, le=1, description="KV cache usage (0..1) per replica to aim for.")
    target_ttft_s: float = Field(2.0, gt=0, description="Mean time to first token in seconds to aim for.")
    look_back_period_s: float = Field(10.0, gt=1, description="Seconds over which replica metrics are averaged and the trend is taken.")
    downscale_delay_s: float = Field(120.0, ge=0, description="Quiet period: seconds the load must stay low before replicas are removed.")
    drain_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a replica being removed (scale-in, redeploy, shutdown) may take to finish its requests."
    )


class ServerConfig(_Strict):
    """The OpenAI-compatible HTTP API and its Ray Serve deployments."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on; 0.0.0.0 opens it to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the API.")
    app_name: str = Field("llm", min_length=1, description="Name of the Ray Serve application.")
    min_replicas: int = Field(1, ge=1, description="LLM replicas (one engine each) to start with and keep at least.")
    max_replicas: int = Field(
        1, ge=1, description="Upper bound of LLM replicas; above min_replicas Serve scales on the autoscaling signals."
    )
    replica_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs each LLM replica reserves in Ray; a replica no node has room for makes Ray's autoscaler add one "
        "(with parallel.cluster_autoscales; without it, deploying refuses a replica no node can hold).",
    )
    replica_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs each LLM replica reserves; default: 1 when it runs the model itself on CUDA (model.device cuda, "
        "tensor_parallel x pipeline_parallel 1), else 0 (parallel workers reserve their own).",
    )
    max_ongoing_requests: int = Field(128, gt=0, description="Requests one LLM replica holds at once (running plus waiting in its engine).")
    max_queued_requests: int = Field(
        256, ge=0, description="Requests each API replica queues while all LLM replicas are full; beyond it 503."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 when the queue is full.")
    stall_timeout_s: float = Field(
        60.0, gt=0, description="Seconds an engine may have work without progress before it counts as unhealthy."
    )
    health_check_period_s: float = Field(
        10.0, gt=0, description="Seconds between Serve's health checks of an LLM replica; three failures in a row replace it."
    )
    health_check_timeout_s: float = Field(30.0, gt=0, description="Seconds a health check may take before it counts as failed.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of each node's metrics endpoint for Prometheus; 0 picks a free one.")
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServerConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


class LLMConfig(_Strict):
    """Everything one engine needs, and how to serve it."""

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    parallel: ParallelConfig = ParallelConfig()
    server: ServerConfig = ServerConfig()

    @model_validator(mode="after")
    def _deepspeed_serves_float_weights(self) -> LLMConfig:
        if self.parallel.backend == "deepspeed" and self.model.quantization != "none":
            raise ValueError(
                f"quantization {self.model.quantization!r} runs on the native backend only; the deepspeed backend serves float weights"
            )
        return self
