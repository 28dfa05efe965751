#!/usr/bin/env bash
# The rest of the performance report: authenticated Allocate transactions per
# second, memory per idle allocation at 10 000 allocations, and 1 vs 2 workers.
#
#   benches/load/extras.sh [RESULTS.jsonl]
#
# Loopback only; needs coturn (apt-get install coturn) for its columns.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/load-extras.jsonl}
DURATION=${DURATION:-5}
HOLD=${HOLD:-10000}
cargo build --release --bins >&2
ulimit -n "$(ulimit -Hn)" || true
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
bench=target/release/turnstile-bench

# Each starter leaves the server's PID in $p (not a subshell, so the exit trap
# knows every server it has to stop).
turnstile() { # CPUS CONFIG
    taskset -c "$1" target/release/turnstile --config "$2" >target/load-turnstile.log 2>&1 &
    p=$!; pids+=("$p"); sleep 1
}
coturn() { # CPUS
    taskset -c "$1" turnserver -n --listening-ip=127.0.0.1 --listening-port=3479 \
        --relay-ip=127.0.0.1 --min-port=16001 --max-port=30000 --lt-cred-mech \
        --user=alice:secret --realm=bench.local --allow-loopback-peers --no-cli --no-tls \
        --no-dtls --no-tcp --relay-threads=1 --total-quota=0 --user-quota=0 \
        --log-file=target/load-coturn.log --simple-log --no-stdout-log >/dev/null 2>&1 &
    p=$!; pids+=("$p"); sleep 1
}
record() { # LABEL JSON
    echo "{\"run\":\"$1\",${2#\{}" | tee -a "$out" >&2
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; sleep 0.5; }
run() { # LABEL COMMAND...: records the command's report, or its failure
    local label=$1; shift
    local line
    if line=$("$@"); then record "$label" "$line"; else record "$label" '{"error":true}'; fi
}

: >"$out"
one=benches/load/turnstile.toml
two=target/load-turnstile-2-workers.toml
sed 's/^workers = 1$/workers = 2/' "$one" >"$two"

# Allocate + Refresh(0) cycles, 64 clients, server on CPU 0, generator on CPU 1:
# "new-clients" makes every allocation a new client (new address and port,
# 401 challenge first); "warm" reuses address, realm and nonce where allowed.
turnstile 0 "$one"
run "allocate-rate warm turnstile" taskset -c 1 $bench allocate-rate --json --server 127.0.0.1:3478 --server-pid "$p" -c 64 -d "$DURATION"
run "allocate-rate new-clients turnstile" taskset -c 1 $bench allocate-rate --cold --rotate-ips 200 --json --server 127.0.0.1:3478 --server-pid "$p" -c 64 -d "$DURATION"
stop "$p"
# Memory per idle allocation on a fresh process (allocator state left by the
# churn above would blur it).
turnstile 0 "$one"
run "hold turnstile" taskset -c 1 $bench hold --json --server 127.0.0.1:3478 --server-pid "$p" -k "$HOLD"
stop "$p"
coturn 0
run "allocate-rate warm coturn" taskset -c 1 $bench allocate-rate --json --server 127.0.0.1:3479 --server-pid "$p" -c 64 -d "$DURATION"
run "allocate-rate new-clients coturn" taskset -c 1 $bench allocate-rate --cold --rotate-ips 200 --json --server 127.0.0.1:3479 --server-pid "$p" -c 64 -d "$DURATION"
stop "$p"
coturn 0
run "hold coturn" taskset -c 1 $bench hold --json --server 127.0.0.1:3479 --server-pid "$p" -k "$HOLD"
stop "$p"

# Workers: one worker on CPU 0 against two workers on both CPUs; the generator
# is not pinned (on two cores it shares them with the second worker).
for k in 1 100; do
    turnstile 0 "$one"
    run "workers=1 k=$k" $bench load --json --server-pid "$p" -k "$k" -s 100 -d "$DURATION"
    stop "$p"
    turnstile 0-1 "$two"
    run "workers=2 k=$k" $bench load --json --server-pid "$p" -k "$k" -s 100 -d "$DURATION"
    stop "$p"
done
