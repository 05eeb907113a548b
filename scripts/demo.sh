#!/usr/bin/env bash
# The main job, end to end on embedded defaults: install, generate a synthetic log, prepare it,
# train TLSAN and SASRec, export the run validation prefers, load the online store and start the
# /recommend service (SQLite feature store, MLflow in mlruns/). Ctrl-C stops the service.
#   DEMO_DIR=out/demo (outputs)   DEMO_SERVE=0 (stop after the example request)   PORT=3000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
DIR=${DEMO_DIR:-out/demo}
PORT=${PORT:-3000}
STORE="sqlite:///$DIR/feature_store.db"
mkdir -p "$DIR"

tlsan generate --users 3000 --items 2000 --events 120000 --seed 0 --out "$DIR/raw" --overwrite
tlsan prepare --interactions "$DIR/raw/interactions.parquet" --items "$DIR/raw/items.parquet" \
  --out "$DIR/data" --session gap:30m --split leave-one-out --max-events-per-user 200 --overwrite
# TLSAN and SASRec on the same split; validation picks the one to serve (test is only reported)
rm -rf "$DIR/run-tlsan" "$DIR/run-sasrec"  # fresh runs (tlsan train refuses to overwrite a run dir)
tlsan train --data "$DIR/data" --out "$DIR/run-tlsan" --preset default --epochs 5
tlsan train --data "$DIR/data" --out "$DIR/run-sasrec" --model sasrec --epochs 5
tlsan compare "$DIR/run-tlsan" "$DIR/run-sasrec" --data "$DIR/data" --json "$DIR/compare.json"
RUN=$(.venv/bin/python -c "import json; print(json.load(open('$DIR/compare.json'))['preferred'])")
tlsan evaluate --run "$RUN" --data "$DIR/data" --split test --json "$DIR/test_metrics.json"
tlsan export --run "$RUN" --data "$DIR/data" --out "$DIR/bundle" --overwrite
tlsan materialize --data "$DIR/data" --store "$STORE"

tlsan serve --bundle "$DIR/bundle" --store "$STORE" --port "$PORT" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
USER_ID=$(.venv/bin/python -c "import polars as pl; print(pl.read_parquet('$DIR/data/vocab/users.parquet')['user_id'][0])")
set -x
curl -s -X POST "http://127.0.0.1:$PORT/recommend" -H 'content-type: application/json' \
  -d "{\"user_id\": \"$USER_ID\", \"k\": 5}"
set +x
echo
if [ "${DEMO_SERVE:-1}" = 1 ]; then
  echo "service running on http://127.0.0.1:$PORT (OpenAPI page at /, document at /docs.json); Ctrl-C to stop"
  wait $SERVER
fi
