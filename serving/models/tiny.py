"""Tiny randomly initialised models in Hugging Face format, for tests that need a real folder in milliseconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.trainers import BpeTrainer

from serving.models.gguf_convert import byte_level_bpe, write_json, write_tokenizer

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_VOCAB_SIZE = 384
# Wide enough weights that greedy outputs differ between prompts (std 0.02 gives near-uniform logits).
_STD = 0.1
_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads a prompt and writes the next word,
then the next, until it reaches the end of its answer or the limit the user asked for. The server keeps
the keys and values of every token in a paged cache, so that many requests can share the same memory and
the same prefix. When a new request arrives, the scheduler decides which requests run in the next step,
how many prompt tokens each one may process, and which requests must wait. What is the capital of France?
The capital of France is Paris. What is the capital of Germany? The capital of Germany is Berlin.
Hello, world! How are you today? I am fine, thank you. Please write a short poem about the sea.
"""


def make_tiny_llama(
    out_dir: Path,
    *,
    architecture: str = "LlamaForCausalLM",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    rope_scaling: dict[str, Any] | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a deterministic random model of `architecture` (Llama, Mistral or Qwen2) to `out_dir`."""
    if architecture not in _MODEL_TYPES:
        raise ValueError(f"architecture must be one of {sorted(_MODEL_TYPES)}, not {architecture!r}")
    tokenizer = _tiny_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    head_dim = hidden_size // num_heads
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * _STD

    def norm() -> torch.Tensor:
        return 1.0 + randn(hidden_size)

    weights = {"model.embed_tokens.weight": randn(vocab_size, hidden_size), "model.norm.weight": norm()}
    if not tie_word_embeddings:
        weights["lm_head.weight"] = randn(vocab_size, hidden_size)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    for i in range(num_layers):
        layer = f"model.layers.{i}."
        weights |= {
            layer + "input_layernorm.weight": norm(),
            layer + "self_attn.q_proj.weight": randn(q_size, hidden_size),
            layer + "self_attn.k_proj.weight": randn(kv_size, hidden_size),
            layer + "self_attn.v_proj.weight": randn(kv_size, hidden_size),
            layer + "self_attn.o_proj.weight": randn(hidden_size, q_size),
            layer + "post_attention_layernorm.weight": norm(),
            layer + "mlp.gate_proj.weight": randn(intermediate_size, hidden_size),
            layer + "mlp.up_proj.weight": randn(intermediate_size, hidden_size),
            layer + "mlp.down_proj.weight": randn(hidden_size, intermediate_size),
        }
        if architecture == "Qwen2ForCausalLM":
            weights |= {
                layer + "self_attn.q_proj.bias": randn(q_size),
                layer + "self_attn.k_proj.bias": randn(kv_size),
                layer + "self_attn.v_proj.bias": randn(kv_size),
            }

    special_ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # <|im_start|>, <|im_end|>, <|im_end|>
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": _MODEL_TYPES[architecture],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        **special_ids,
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if architecture == "LlamaForCausalLM":
        config |= {"attention_bias": False, "mlp_bias": False}
    else:
        config |= {"sliding_window": None, "use_sliding_window": False}

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", special_ids)
    write_tokenizer(
        out_dir,
        tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=_CHATML,
        model_max_length=max_position_embeddings,
        add_bos_token=False,
    )
    return out_dir


def _tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE like SmolLM2's: every byte is a token, so any text round-trips."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer = byte_level_bpe(pre_tokenizer, vocab={}, merges=[])
    trainer = BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT], trainer)
    return tokenizer
