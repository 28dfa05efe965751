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

turnstile() { # CPUS CONFIG
    taskset -c "$1" target/release/turnstile --config "$2" >target/load-turnstile.log 2>&1 &
    pids+=("$!"); sleep 1; echo "$!"
}
coturn() { # CPUS
    taskset -c "$1" turnserver -n --listening-ip=127.0.0.1 --listening-port=3479 \
        --relay-ip=127.0.0.1 --min-port=46000 --max-port=60000 --lt-cred-mech \
        --user=alice:secret --realm=bench.local --allow-loopback-peers --no-cli --no-tls \
        --no-dtls --no-tcp --relay-threads=1 --total-quota=0 --user-quota=0 \
        --log-file=target/load-coturn.log --simple-log --no-stdout-log >/dev/null 2>&1 &
    pids+=("$!"); sleep 1; echo "$!"
}
record() { # LABEL JSON
    echo "{\"run\":\"$1\",${2#\{}" | tee -a "$out" >&2
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; sleep 0.5; }

: >"$out"
one=benches/load/turnstile.toml
two=target/load-turnstile-2-workers.toml
sed 's/^workers = 1$/workers = 2/' "$one" >"$two"

# Allocate + Refresh(0) cycles, 64 clients, server on CPU 0, generator on CPU 1.
p=$(turnstile 0 "$one")
record "allocate-rate turnstile" "$(taskset -c 1 $bench allocate-rate --json --server 127.0.0.1:3478 --server-pid "$p" -c 64 -d "$DURATION")"
record "allocate-rate-cold turnstile" "$(taskset -c 1 $bench allocate-rate --cold --json --server 127.0.0.1:3478 --server-pid "$p" -c 64 -d "$DURATION")"
record "hold turnstile" "$(taskset -c 1 $bench hold --json --server 127.0.0.1:3478 --server-pid "$p" -k "$HOLD")"
stop "$p"
p=$(coturn 0)
record "allocate-rate coturn" "$(taskset -c 1 $bench allocate-rate --json --server 127.0.0.1:3479 --server-pid "$p" -c 64 -d "$DURATION")"
record "allocate-rate-cold coturn" "$(taskset -c 1 $bench allocate-rate --cold --json --server 127.0.0.1:3479 --server-pid "$p" -c 64 -d "$DURATION")"
record "hold coturn" "$(taskset -c 1 $bench hold --json --server 127.0.0.1:3479 --server-pid "$p" -k "$HOLD")"
stop "$p"

# Workers: one worker on CPU 0 against two workers on both CPUs; the generator
# is not pinned (on two cores it shares them with the second worker).
for k in 1 100; do
    p=$(turnstile 0 "$one")
    record "workers=1 k=$k" "$($bench load --json --server-pid "$p" -k "$k" -s 100 -d "$DURATION")"
    stop "$p"
    p=$(turnstile 0-1 "$two")
    record "workers=2 k=$k" "$($bench load --json --server-pid "$p" -k "$k" -s 100 -d "$DURATION")"
    stop "$p"
done
