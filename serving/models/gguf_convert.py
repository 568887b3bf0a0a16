"""Convert a llama-architecture GGUF file into a float32 Hugging Face LlamaForCausalLM folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.constants import TokenType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tqdm import tqdm

from serving.errors import ModelSourceError

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's `tokenizer.ggml.pre` names, as `tokenizers` pre-tokenizers.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
}


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, keep_gguf: bool = False) -> Path:
    """Dequantize `gguf_path` to float32 and write it as a Hugging Face folder at `out_dir` (replaced if present);
    with `keep_gguf` the folder also gets a copy of the file, to be served in its own precision."""
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelSourceError(f"{gguf_path} holds a {arch!r} model; only llama-architecture GGUFs can be converted")
    n_head = meta["llama.attention.head_count"]
    n_kv_head = meta.get("llama.attention.head_count_kv", n_head)
    tensor_names = {t.name for t in reader.tensors}
    config = _llama_config(meta, reader, tie_word_embeddings="output.weight" not in tensor_names)
    tokenizer = _gguf_tokenizer(meta, gguf_path)

    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor"):
        shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        weights = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        if ".attn_q." in t.name:
            weights = undo_rope_permute(weights, n_head)
        elif ".attn_k." in t.name:
            weights = undo_rope_permute(weights, n_kv_head)
        tensors[hf_tensor_name(t.name, gguf_path)] = np.ascontiguousarray(weights)
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        special_ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        write_json(tmp / "generation_config.json", special_ids)
        token = tokenizer.id_to_token
        write_tokenizer(
            tmp,
            tokenizer,
            bos_token=token(config["bos_token_id"]) if "bos_token_id" in config else None,
            eos_token=token(config["eos_token_id"]),
            pad_token=token(config["pad_token_id"]) if "pad_token_id" in config else None,
            chat_template=meta.get("tokenizer.chat_template"),
            model_max_length=config["max_position_embeddings"],
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )
        if keep_gguf:
            shutil.copyfile(gguf_path, tmp / gguf_path.name)
        _apply_umask(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def byte_level_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, *, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer with the given pre-tokenizer."""
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def write_tokenizer(
    out_dir: Path,
    tokenizer: Tokenizer,
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    chat_template: str | None,
    model_max_length: int,
    add_bos_token: bool,
) -> None:
    """Write tokenizer.json and a tokenizer_config.json that transformers and the engine both read."""
    if add_bos_token and bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    if pad_token is not None:
        config["pad_token"] = pad_token
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(out_dir / "tokenizer_config.json", config)


def _llama_config(meta: dict[str, Any], reader: GGUFReader, *, tie_word_embeddings: bool) -> dict[str, Any]:
    embeddings = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": meta["llama.attention.head_count"],
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"]),
        "hidden_act": "silu",
        "rms_norm_eps": _short_float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _short_float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": int(embeddings.shape[1]),
        "tie_word_embeddings": tie_word_embeddings,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if "llama.attention.key_length" in meta:
        config["head_dim"] = meta["llama.attention.key_length"]
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _short_float(meta["llama.rope.scaling.factor"])}
    elif scaling != "none":
        raise ModelSourceError(f"GGUF rope scaling {scaling!r} is not supported by the converter")
    for key, gguf_key in [("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")]:
        if f"tokenizer.ggml.{gguf_key}_token_id" in meta:
            config[key] = meta[f"tokenizer.ggml.{gguf_key}_token_id"]
    return config


def _gguf_tokenizer(meta: dict[str, Any], gguf_path: Path) -> Tokenizer:
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ModelSourceError(
            f"{gguf_path} uses tokenizer {model!r} with pre-tokenizer {pre!r}; the converter supports "
            f"'gpt2' (byte-level BPE) with pre-tokenizers {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = byte_level_bpe(_PRE_TOKENIZERS[pre](), vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    types = meta["tokenizer.ggml.token_type"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TokenType.CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TokenType.USER_DEFINED])
    return tokenizer


def hf_tensor_name(name: str, gguf_path: Path) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match is None or match[2] not in _LAYER_TENSORS:
        raise ModelSourceError(f"{gguf_path} has tensor {name!r}, which has no Hugging Face Llama counterpart")
    return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"


def undo_rope_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row order: per head it interleaves the two rotary halves (HF keeps them apart)."""
    head_dim = weights.shape[0] // n_head
    return weights.reshape(n_head, head_dim // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _short_float(value: float) -> float:
    """GGUF stores float32; print 1e-05 rather than 9.999999747378752e-06."""
    return float(f"{value:.7g}")


def _apply_umask(folder: Path) -> None:
    """mkdtemp and safetensors make owner-only entries; give them the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old)
