"""The architecture description read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ModelSourceError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The architecture transformers builds for a config.json that names only its model_type.
ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelArch:
    """Shapes and constants of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_folder(cls, folder: Path) -> ModelArch:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelSourceError(f"{folder} has no config.json: not a Hugging Face model folder")
        return cls.from_config(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_config(cls, cfg: dict) -> ModelArch:
        model_type = cfg.get("model_type", "unknown")
        arch = (cfg.get("architectures") or [ARCHITECTURE_OF_MODEL_TYPE.get(model_type, model_type)])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported by the native engine; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
        )


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict) -> dict | None:
    """The scaling dict, or None for plain RoPE; only 'llama3' scaling is implemented."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (only 'llama3')")
    return dict(scaling)


def model_limits(folder: Path) -> tuple[int, int]:
    """(vocabulary size, context length) of any Hugging Face causal LM's config.json, for models
    the native engine does not implement (the deepspeed backend runs them)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg = {**cfg.get("text_config", {}), **cfg}
    context = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length") if k in cfg), None)
    if "vocab_size" not in cfg or context is None:
        raise ModelSourceError(f"{path} names no vocabulary size or context length")
    return cfg["vocab_size"], context
