#!/usr/bin/env bash
# Installs every system tool and Python package drtool's demo and tests need.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(restic b3sum postgresql zfs-fuse openssh-client openssh-server snapraid mergerfs etcd-server etcd-client ceph-mon ceph-mgr ceph-osd ceph-mds ceph-common ceph-fuse)   # later backends append their tools here

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
# Byte-compile drtool itself: with PYTHONDONTWRITEBYTECODE set (as on our machines)
# every command would otherwise recompile the package (~0.1 s per run).
.venv/bin/python -m compileall -q drtool >/dev/null
