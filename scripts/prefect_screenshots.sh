#!/usr/bin/env bash
# Screenshots of the Prefect UI for the README: a nightly flow run's run graph and Logs tab, from a real headless
# browser (Debian's chromium), of a night run through `nightrec serve` as a user would.
# usage: scripts/prefect_screenshots.sh [NIGHTREC_HOME] [RUN_DATE] [OUT_DIR]
#   (after `make demo`: the home's demo/ files are the night's sources; needs /usr/bin/chromium)
set -euo pipefail
HOME_DIR=$(realpath "${1:-.nightrec}")
RUN_DATE=${2:-2026-11-23}
OUT=$(realpath -m "${3:-docs/img}")
PORT=${PORT:-4255}
BIN=$(dirname "$(realpath "$0")")/../.venv/bin
mkdir -p "$OUT"
export NIGHTREC_HOME="$HOME_DIR"
for kind in events items users; do
  for file in "$HOME_DIR"/demo/"$kind".*; do [ -f "$file" ] && export "NIGHTREC_${kind^^}_SOURCE=$file"; done
done
"$BIN/nightrec" serve --port "$PORT" >/tmp/nightrec-serve.log 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 120); do grep -q "Prefect UI:" /tmp/nightrec-serve.log && break; sleep 1; done
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
RUN=$("$BIN/python" - "$RUN_DATE" <<'PY'
import sys, time
from prefect.deployments import run_deployment

for _ in range(60):  # the runner registers the deployments a moment after the server is up
    try:
        run = run_deployment("nightly/nightly", parameters={"run_date": sys.argv[1]}, timeout=900)
        break
    except Exception:
        time.sleep(2)
assert run.state.is_completed(), run.state
print(run.id)
PY
)
shot() {  # name url height
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --window-size=1500,"$3" --virtual-time-budget=25000 --screenshot="$OUT/$1.png" "$2" 2>/dev/null
}
shot prefect-flow-run "http://127.0.0.1:$PORT/runs/flow-run/$RUN" 1500
ls -l "$OUT"/prefect-*.png
