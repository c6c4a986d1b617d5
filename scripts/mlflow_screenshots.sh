#!/usr/bin/env bash
# Screenshots of the MLflow UI for the README, from a real headless browser (Debian's chromium).
# usage: scripts/mlflow_screenshots.sh [NIGHTREC_HOME] [OUT_DIR]   (after `make demo`; needs /usr/bin/chromium)
set -euo pipefail
HOME_DIR=$(realpath "${1:-.nightrec}")
OUT=$(realpath -m "${2:-docs/img}")
PORT=${PORT:-5055}
BIN=$(dirname "$(realpath "$0")")/../.venv/bin
mkdir -p "$OUT"
NIGHTREC_HOME="$HOME_DIR" "$BIN/nightrec" ui --port "$PORT" >/tmp/nightrec-ui.log 2>&1 &
UI=$!
trap 'kill $UI 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
# experiment and run ids from the store itself
read -r EXP RUN < <("$BIN/python" - "$HOME_DIR" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
exp = client.get_experiment_by_name("nightrec")
run = client.search_runs([exp.experiment_id], "tags.`nightrec.kind` = 'nightly'", order_by=["start_time DESC"])[0]
print(exp.experiment_id, run.info.run_id)
PY
)
shot() {  # name url
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --window-size=1500,950 --virtual-time-budget=20000 --screenshot="$OUT/$1.png" "$2" 2>/dev/null
}
BASE="http://127.0.0.1:$PORT/#"
shot mlflow-runs "$BASE/experiments/$EXP/runs"
shot mlflow-night "$BASE/experiments/$EXP/runs/$RUN"
shot mlflow-night-artifacts "$BASE/experiments/$EXP/runs/$RUN/artifacts"
shot mlflow-model "$BASE/models/nightrec-recommender"
ls -l "$OUT"
