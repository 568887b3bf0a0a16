"""The one typed configuration object that flows from CLI flags, YAML and Helm values to workers.

Every default lives here and nowhere else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """What to serve and in which numeric format."""

    source: str = Field(
        "default",
        description="A Hugging Face-format folder, a Hub repo id, or 'default' for the embedded SmolLM2-135M-Instruct.",
    )
    served_name: str | None = Field(None, description="Name clients use in the API; defaults to the folder name.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is float32 on CPU and bfloat16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when available.")
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + output in tokens; defaults to the model's context length."
    )


class EngineConfig(_Strict):
    """Paged KV cache and scheduler settings."""

    block_size: int = Field(16, gt=0, description="Tokens per KV cache block.")
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="KV cache budget in GiB; default: 2 GiB on CPU, 90% of free memory on CUDA."
    )
    max_num_seqs: int = Field(64, gt=0, description="Most sequences in the running batch.")
    max_num_batched_tokens: int = Field(2048, gt=0, description="Token budget of one engine step.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts over several steps.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs for decode (CUDA only).")
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch; default: torch's choice.")

    @model_validator(mode="after")
    def _budget_holds_a_block(self) -> "EngineConfig":
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        return self


class LLMConfig(_Strict):
    """Everything one engine needs."""

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LLMConfig":
        with open(path, encoding="utf-8") as f:
            return cls.model_validate(yaml.safe_load(f) or {})
