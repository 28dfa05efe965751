#!/usr/bin/env bash
# Live upgrade under load, on loopback: for each table size, the release
# server (a copy, as a package installs it) carries K allocations relaying at
# RATE datagrams/s through the load generator, which refreshes each one every
# few seconds; half-way through, `turnstile upgrade`. Reported per size: how
# long the workers held still (signal to the new process's go-ahead, from the
# old process's log), datagrams lost, the longest gap between echoes (all
# allocations, and one allocation), refreshes answered 437 (the server forgot
# the allocation), echoes whose relayed address moved.
#
#   benches/load/upgrade.sh [RESULTS.jsonl]
#
# Environment: SIZES ("200 1000 10000"), RATE (20000), DURATION (s, 12).
# Everything stays on 127.0.0.1; every run is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/load-upgrade.jsonl}
SIZES=${SIZES:-"200 1000 10000"}
RATE=${RATE:-20000}
DURATION=${DURATION:-12}
dir=$(mktemp -d)
bench_pid=

cleanup() {
    status=$?
    if [ "$status" -ne 0 ]; then
        for f in "$dir"/server-*.log; do [ -f "$f" ] && { echo "== $f" >&2; grep -v 'allocation \(created\|refreshed\|ended\)' "$f" | tail -20 >&2; }; done
    fi
    [ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null
    if [ -f "$dir/turnstile.pid" ]; then kill -9 "$(cat "$dir/turnstile.pid")" 2>/dev/null || true; fi
    pkill -9 -f "$dir/turnstile" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cargo build --release --bins >&2
cp target/release/turnstile "$dir/turnstile"
: >"$out"

metric() {
    curl -s "http://127.0.0.1:39641/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s += $2} END {print s + 0}'
}

for k in $SIZES; do
    cat >"$dir/turnstile.toml" <<EOF
realm = "bench.local"
workers = 2
drain_timeout = 5

[[listen]]
transport = "udp"
address = "127.0.0.1:39478"

# Below Linux's ephemeral range (32768-60999), where the generator's
# 10 000 client sockets take their ports.
[relay]
address = "127.0.0.1"
ports = "20000-31999"

[auth]
users = { alice = "secret" }

[peers]
allow = ["127.0.0.0/8"]

[metrics]
listen = "127.0.0.1:39641"

[log]
level = "warn,turnstile=info,turnstile::proto::server::allocate=warn"

[server]
pid_file = "$dir/turnstile.pid"
EOF
    "$dir/turnstile" --config "$dir/turnstile.toml" 2>"$dir/server-$k.log" &
    for _ in $(seq 100); do [ -f "$dir/turnstile.pid" ] && break; sleep 0.1; done
    target/release/turnstile-bench load --server 127.0.0.1:39478 -k "$k" -d "$DURATION" -r "$RATE" \
        --refresh-every 5 --json >"$dir/load-$k.json" 2>"$dir/load-$k.err" &
    bench_pid=$!
    # Wait for the allocations, let the load run a while, then upgrade.
    for _ in $(seq 1200); do
        [ "$(metric turnstile_allocations_active)" -ge "$k" ] && break
        kill -0 "$bench_pid" 2>/dev/null || { cat "$dir/load-$k.err" >&2; exit 1; }
        sleep 0.1
    done
    sleep $((DURATION / 2))
    "$dir/turnstile" --config "$dir/turnstile.toml" upgrade >&2
    wait "$bench_pid"
    bench_pid=
    line=$(grep 'upgrade: handed over' "$dir/server-$k.log" | tail -1)
    python3 - "$dir/load-$k.json" "$k" "$line" >>"$out" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
field = lambda k: int(re.search(k + r"=(\d+)", sys.argv[3]).group(1)) if re.search(k + "=", sys.argv[3]) else None
lost = r["sent"] - r["client_received"]
print(json.dumps({
    "allocations": int(sys.argv[2]),
    "rate_pps": r["target_pps"],
    "held_still_ms": field("frozen_ms"),
    "export_ms": field("export_ms"),
    "send_ms": field("send_ms"),
    "restore_ms": field("restore_ms"),
    "sent": r["sent"],
    "lost": lost,
    "loss_pct": round(100.0 * lost / max(r["sent"], 1), 4),
    "loss_to_peer": round(r["loss_to_peer"], 6),
    "loss_to_client": round(r["loss_to_client"], 6),
    "longest_gap_ms": round(r["longest_gap_ms"], 1),
    "longest_flow_gap_ms": round(r["longest_flow_gap_ms"], 1),
    "refreshes_sent": r["refreshes_sent"],
    "refreshes_ok": r["refreshes_ok"],
    "refreshes_437": r["refreshes_437"],
    "relay_moved": r["relay_moved"],
}))
PY
    tail -1 "$out"
    pid=$(cat "$dir/turnstile.pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        sleep 1
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/turnstile.pid"
    sleep 0.5
done
