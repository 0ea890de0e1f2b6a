#!/usr/bin/env bash
# Installs every system tool and Python package drtool's demo and tests need.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(restic b3sum postgresql zfs-fuse openssh-client openssh-server snapraid mergerfs etcd-server etcd-client ceph-mon ceph-mgr ceph-osd ceph-mds ceph-common ceph-fuse ffmpeg)   # later backends append their tools here

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "install-deps: apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "install-deps: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.drtool-deps-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "install-deps: installing drtool (editable) with test extras" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# PyTorch (CPU build here; the GPU drill checks and their tests need it). Not in the
# test extra: this pinned wheel is large, and comes from local disk on our machines.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" >/dev/null 2>&1; then
  echo "install-deps: installing torch==2.13.0 and numpy" >&2
  if ! .venv/bin/python -m pip install -q "torch==2.13.0" numpy; then
    echo "install-deps: FAILED to install torch==2.13.0 (the GPU check tests need it)" >&2
    exit 1
  fi
fi
# Byte-compile drtool itself: with PYTHONDONTWRITEBYTECODE set (as on our machines)
# every command would otherwise recompile the package (~0.1 s per run).
.venv/bin/python -m compileall -q drtool >/dev/null
