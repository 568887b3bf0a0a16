"""Rendering the Helm chart for the tests: `helm template` with values files, parsed into objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "llm-cluster"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CRDS = ROOT.parent / "shared" / "kuberay-crds"


def helm_binary() -> str:
    """The helm that scripts/install_helm.sh puts into the venv, else one on PATH."""
    found = shutil.which("helm", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise RuntimeError("helm is not installed: run scripts/install_helm.sh")
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], check=False, capture_output=True, text=True, timeout=120)


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def render(*values_files: Path, release: str = "llm", show_only: str | None = None) -> list[dict[str, Any]]:
    """The objects `helm template` renders (hooks such as the test pod included); raises with helm's message."""
    args = ["template", release, str(CHART), "--namespace", "serving"]
    for path in values_files:
        args += ["-f", str(path)]
    if show_only:
        args += ["--show-only", show_only]
    result = helm(*args)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return [doc for doc in yaml.load_all(result.stdout, Loader=yaml.CSafeLoader) if doc]


def render_error(*values_files: Path) -> str:
    """helm's error message for values that must not render."""
    try:
        render(*values_files)
    except RenderError as error:
        return str(error)
    raise AssertionError("the chart rendered values that should have been refused")


def serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed."""
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


class RenderError(Exception):
    pass


@cache
def crd_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """RayService's schema and RayCluster's spec schema (ray.io/v1), with unknown fields rejected as the
    API server prunes them: every object schema that lists properties gets additionalProperties: false."""

    def schema(file: str) -> dict[str, Any]:
        crd = yaml.load((CRDS / file).read_text(), Loader=yaml.CSafeLoader)  # 17k lines: libyaml, not pure Python
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        return _closed(version["schema"]["openAPIV3Schema"])

    cluster = schema("ray.io_rayclusters.yaml")
    return schema("ray.io_rayservices.yaml"), cluster["properties"]["spec"]


def _closed(node: Any) -> Any:
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _closed(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out
