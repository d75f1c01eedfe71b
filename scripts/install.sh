#!/usr/bin/env bash
# Install cyclereg and its test dependencies on a fresh machine.
# - the system library libusb-1.0 that open3d needs (where apt-get is usable);
# - PyTorch: keeps an installed torch (e.g. your CUDA build); otherwise torch 2.13.0 from pip's index
#   (a local CPU wheel on this project's machines; the CUDA build from the public PyPI on Linux);
# - the package itself (editable) with its test extras.
set -eu
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libusb-1.0-0 >/dev/null 2>&1; } \
      || echo "install.sh: could not install libusb-1.0-0; PLY/PCD I/O (open3d) will report it" >&2
  else
    echo "install.sh: libusb-1.0 missing and apt-get unavailable; PLY/PCD I/O (open3d) will report it" >&2
  fi
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"
