#!/usr/bin/env bash
# Side-by-side relay load: turnstile vs coturn (Debian package) vs the minimal
# forwarder, each pinned to one CPU with the generator on another, scenario by
# scenario so drift on the machine hits all three alike.
#
#   benches/load/compare.sh [RESULTS.jsonl]
#
# Environment: DURATION (s per run, default 5), ALLOCS ("1 10 100 1000"),
# SIZES ("100 1200"), RATES ("0 20000"; 0 = open-loop max), SERVERS
# ("turnstile coturn forwarder"), SERVER_CPU (0), GENERATOR_CPU (1),
# TURNSTILE_CONFIG (benches/load/turnstile.toml), EXTRA ("" — more load flags).
# Loopback only; needs coturn (apt-get install coturn) for the coturn column.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/load-results.jsonl}
DURATION=${DURATION:-5}
ALLOCS=${ALLOCS:-"1 10 100 1000"}
SIZES=${SIZES:-"100 1200"}
RATES=${RATES:-"0 20000"}
SERVERS=${SERVERS:-"turnstile coturn forwarder"}
SERVER_CPU=${SERVER_CPU:-0}
GENERATOR_CPU=${GENERATOR_CPU:-1}
TURNSTILE_CONFIG=${TURNSTILE_CONFIG:-benches/load/turnstile.toml}
EXTRA=${EXTRA:-}

cargo build --release --bins >&2
ulimit -n "$(ulimit -Hn)" || true
declare -A port pid
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start() {
    case $1 in
    turnstile)
        port[turnstile]=3478
        taskset -c "$SERVER_CPU" target/release/turnstile --config "$TURNSTILE_CONFIG" >target/load-turnstile.log 2>&1 &
        ;;
    coturn)
        port[coturn]=3479
        taskset -c "$SERVER_CPU" turnserver -n --listening-ip=127.0.0.1 --listening-port=3479 \
            --relay-ip=127.0.0.1 --min-port=16001 --max-port=30000 --lt-cred-mech \
            --user=alice:secret --realm=bench.local --allow-loopback-peers --no-cli --no-tls \
            --no-dtls --no-tcp --relay-threads=1 --total-quota=0 --user-quota=0 \
            --log-file=target/load-coturn.log --simple-log --no-stdout-log >/dev/null 2>&1 &
        ;;
    forwarder)
        port[forwarder]=3490
        taskset -c "$SERVER_CPU" target/release/turnstile-bench forwarder --listen 127.0.0.1:3490 \
            >target/load-forwarder.log 2>&1 &
        ;;
    esac
    pid[$1]=$!
    pids+=("$!")
}

for s in $SERVERS; do start "$s"; done
sleep 1
: >"$out"
for k in $ALLOCS; do
    for size in $SIZES; do
        for rate in $RATES; do
            for s in $SERVERS; do
                line=$(taskset -c "$GENERATOR_CPU" target/release/turnstile-bench load --json \
                    --server "127.0.0.1:${port[$s]}" --server-pid "${pid[$s]}" \
                    -k "$k" -s "$size" -r "$rate" -d "$DURATION" $EXTRA) || line='{"error":true}'
                echo "{\"server\":\"$s\",${line#\{}" | tee -a "$out" >&2
                sleep 0.5
            done
        done
    done
done
python3 benches/load/table.py "$out"
