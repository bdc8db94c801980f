#!/usr/bin/env bash
# Measure the traffic Flower's SuperLink counts for several uplink settings.
#
# Starts a SuperLink and NODES SuperNodes on 127.0.0.1 (free port, temporary
# FLWR_HOME, telemetry and update checks off, no runtime dependency
# installation), runs this app once per setting with `flwr run --stream`, and
# prints what `flwr ls --format json` reports next to the codec's payload bytes.
# Everything it started is stopped on exit.
#
# The last column is Flower's own cost per reply: (inbound - codec payloads) / replies.
#
# Usage: examples/flower/measure_traffic.sh [ROUNDS] [NODES]   (default: 2 2)
#        SETTINGS='bits="2"' examples/flower/measure_traffic.sh   (one setting only)
# Needs: fedquant[flower] installed in the active environment (flwr on PATH).
set -euo pipefail
set -m  # background jobs get their own process group: `kill -- -PID` stops their children too

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROUNDS="${1:-2}"
NODES="${2:-2}"
WORK="$(mktemp -d)"
export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export OMP_NUM_THREADS=1 FEDQUANT_CACHE="$WORK/cache"
PY="$(command -v python3 || command -v python)"
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PORT="$(free_port)"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local"

[superlink.local]
address = "127.0.0.1:$PORT"
insecure = true
EOF

flower-superlink --insecure --host 127.0.0.1 --port "$PORT" \
    --disable-runtime-dependency-installation > "$WORK/superlink.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do
    "$PY" -c "import socket,sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $PORT)))" && break
    sleep 0.2
done
for ((i = 0; i < NODES; i++)); do
    flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port "$(free_port)" \
        --node-config "partition-id=$i num-partitions=$NODES" > "$WORK/supernode-$i.log" 2>&1 &
    PIDS+=("$!")
done

printf '%-22s %12s %12s %12s %8s %12s %9s %14s\n' \
    setting "codec B" "Flower in B" "float32 B" "ratio" "Flower out B" accuracy "overhead B/reply"
if [[ -n "${SETTINGS:-}" ]]; then
    LIST=("$SETTINGS")
else
    LIST=('bits="32"' 'bits="8"' 'bits="4-2-2-4"' 'bits="2"' 'bits="2" downlink-bits="8"')
fi
for setting in "${LIST[@]}"; do
    flwr run "$HERE" local --stream --run-config \
        "num-server-rounds=$ROUNDS min-nodes=$NODES $setting results-path=\"$WORK/results.json\"" \
        > "$WORK/run.log" 2>&1
    flwr ls local --format json > "$WORK/ls.json"
    SETTING="$setting" ROUNDS="$ROUNDS" "$PY" - "$WORK/ls.json" "$WORK/results.json" <<'EOF'
import json, os, sys
runs = json.load(open(sys.argv[1]))["runs"]
run = max(runs, key=lambda r: r["pending-at"])  # the run just finished
res = json.load(open(sys.argv[2]))
rounds = range(1, int(os.environ["ROUNDS"]) + 1)
codec = sum(res["train"][str(r)]["fedquant.uplink-bytes"] for r in rounds)
replies = sum(res["train"][str(r)]["fedquant.clients"] for r in rounds)
float32 = replies * res["float32-bytes"]
inbound = run["network-traffic"]["inbound-bytes"]
outbound = run["network-traffic"]["outbound-bytes"]
acc = res["central"][str(max(rounds))]["accuracy"]
assert run["status"] == "finished:completed", run["status"]
print(f"{os.environ['SETTING']:<22} {codec:>12} {inbound:>12} {float32:>12} "
      f"{float32 / inbound:>7.1f}x {outbound:>12} {acc:>9.3f} {(inbound - codec) / replies:>14.0f}")
EOF
done
