#!/usr/bin/env bash
# `make demo`: back up a generated sample directory to two restic repositories,
# verify them, and print `drtool status`. Re-running it works (a new snapshot each time).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-/var/tmp/drtool-demo}
DRTOOL=${DRTOOL:-.venv/bin/drtool}
CONFIG=policies/demo.yaml

if [ "$DEMO_DIR" != /var/tmp/drtool-demo ]; then
  # the policy file names /var/tmp/drtool-demo; use a rewritten copy for another dir
  mkdir -p "$DEMO_DIR"
  sed "s#/var/tmp/drtool-demo#$DEMO_DIR#g" policies/demo.yaml > "$DEMO_DIR/demo.yaml"
  CONFIG="$DEMO_DIR/demo.yaml"
fi
export DRTOOL_STATE_DIR="$DEMO_DIR/state"

.venv/bin/python scripts/make_sample_tree.py "$DEMO_DIR/source"
if [ ! -s "$DEMO_DIR/restic-password" ]; then
  umask 077
  head -c 24 /dev/urandom | base64 > "$DEMO_DIR/restic-password"
fi

echo "== drtool policy explain (static 3-2-1-1-0)"
"$DRTOOL" -c "$CONFIG" policy explain
echo "== drtool run (back up both legs, then the verifications that are due)"
"$DRTOOL" -c "$CONFIG" run
echo "== drtool status (computed from the live repositories and the catalog)"
"$DRTOOL" -c "$CONFIG" status
echo "demo ok: state in $DRTOOL_STATE_DIR; try: DRTOOL_STATE_DIR=$DRTOOL_STATE_DIR $DRTOOL -c $CONFIG inventory"
