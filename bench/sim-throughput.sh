#!/usr/bin/env bash
# System benchmark of the simulator: one `fleetpick-lab sim` process simulating many servers, and the
# load generator in a second process on the same machine.
#   1. short non-streaming completions, Poisson arrivals at RATE/s spread over every server;
#   2. /metrics scraped on every server at the picker's poll rate (every 50 ms), to price the page.
# Each phase reports requests served, latency, and the CPU seconds of both processes, so the
# load tool's share of the cores is stated beside the result.
#
# Usage: bench/sim-throughput.sh   (env: SERVERS=64 RATE=2500 DURATION=20 TIME_SCALE=1)
set -euo pipefail
cd "$(dirname "$0")/.."
SERVERS=${SERVERS:-64}
RATE=${RATE:-2500}
DURATION=${DURATION:-20}
TIME_SCALE=${TIME_SCALE:-1}
out=bench/out/sim-throughput
mkdir -p "$out"
cargo build --release --quiet -p fleetpick-lab
bin=target/release/fleetpick-lab
ready="$out/ready.json"
rm -f "$ready"
setsid "$bin" sim --servers "$SERVERS" --clusters a,b,c,d --time-scale "$TIME_SCALE" \
  --ready-file "$ready" >"$out/sim.log" 2>&1 &
sim_pid=$!
trap 'kill "$sim_pid" 2>/dev/null || true' EXIT
for _ in $(seq 300); do [ -s "$ready" ] && break; sleep 0.1; done
[ -s "$ready" ] || { echo "simulator did not become ready" >&2; exit 1; }

echo "== phase 1: $SERVERS servers, Poisson $RATE/s short completions for ${DURATION}s =="
"$bin" load --ready-file "$ready" --rate "$RATE" --duration "$DURATION" \
  --prompt-bytes 64 --max-tokens 4 --watch-pid "$sim_pid" --json-out "$out/completions.json" \
  | tee "$out/completions-summary.json"

scrape_rate=$((SERVERS * 20))
echo "== phase 2: /metrics on every server every 50 ms ($scrape_rate scrapes/s) for ${DURATION}s =="
"$bin" load --ready-file "$ready" --rate "$scrape_rate" --duration "$DURATION" \
  --get /metrics --watch-pid "$sim_pid" --json-out "$out/metrics.json" \
  | tee "$out/metrics-summary.json"
addr=$(grep -m1 '"address"' "$ready" | sed 's/.*"address": "\(.*\)".*/\1/')
bytes=$(curl -s "http://$addr/metrics" | wc -c)
echo "one /metrics page: $bytes bytes"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); date: $(date -u +%F)"
