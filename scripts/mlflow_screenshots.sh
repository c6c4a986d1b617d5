#!/usr/bin/env bash
# Screenshots of the MLflow UI for the README, from a real headless browser (Debian's chromium).
# usage: scripts/mlflow_screenshots.sh [NIGHTREC_HOME] [OUT_DIR]   (after `make demo`; needs /usr/bin/chromium)
# WINDOW=W,H sets the browser window (a tall one shows the whole run page). The run pages open in MLflow's "Model
# training" view (?workflowType=machine_learning); the assistant panel MLflow 3.17 opens on the right is cut off.
set -euo pipefail
HOME_DIR=$(realpath "${1:-.nightrec}")
OUT=$(realpath -m "${2:-docs/img}")
PORT=${PORT:-5055}
BIN=$(dirname "$(realpath "$0")")/../.venv/bin
mkdir -p "$OUT"
NIGHTREC_HOME="$HOME_DIR" setsid "$BIN/nightrec" ui --port "$PORT" >/tmp/nightrec-ui.log 2>&1 &
UI=$!
trap 'kill -TERM -- -$UI 2>/dev/null || true' EXIT  # its own process group: the MLflow server child too
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
    --window-size=${WINDOW:-1500,950} --virtual-time-budget=20000 --screenshot="$OUT/$1.png" "$2" 2>/dev/null
  "$BIN/python" -c 'import sys; from PIL import Image; i = Image.open(sys.argv[1]); i.crop((0, 0, i.width - int(sys.argv[2]), i.height)).save(sys.argv[1])' \
    "$OUT/$1.png" "$ASSISTANT"
}
ASSISTANT=388  # width in pixels of MLflow's assistant side panel
BASE="http://127.0.0.1:$PORT/#"
shot mlflow-runs "$BASE/experiments/$EXP/runs?workflowType=machine_learning"
shot mlflow-night "$BASE/experiments/$EXP/runs/$RUN?workflowType=machine_learning"
shot mlflow-night-artifacts "$BASE/experiments/$EXP/runs/$RUN/artifacts"
shot mlflow-model "$BASE/models/nightrec-recommender"
ls -l "$OUT"
