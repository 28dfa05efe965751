#!/usr/bin/env bash
# The XDP fast path against turnstile's userspace relay and coturn, on one
# topology: a client namespace (the load generator and its echo peers) and
# a server namespace joined by a veth pair, addresses from 198.18.0.0/15.
# Needs root, clang, libbpf-dev, ethtool, coturn.
#
#   benches/load/xdp.sh [RESULTS.jsonl]
#
# For each server: a run at a fixed rate (RATE packets/s each way, default
# 50000) for machine-wide CPU per relayed packet — on veth the XDP program
# runs in the sender's softirq, so whole-machine busy time from /proc/stat
# is the honest figure — and a run at the maximum rate for throughput and
# loss. With XDP, the program's own cost per packet comes from the kernel's
# BPF statistics (kernel.bpf_stats_enabled, run_time_ns / run_cnt).
# Environment: DURATION (s, default 5), RATE (50000), ALLOCS (10), SIZE (100),
# SERVERS ("xdp userspace coturn"), MORE_RATES ("": further fixed rates per
# server, to find the highest each relays with at most 1 % loss).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/load-xdp.jsonl}
DURATION=${DURATION:-5}
RATE=${RATE:-50000}
ALLOCS=${ALLOCS:-10}
SIZE=${SIZE:-100}
SERVERS=${SERVERS:-"xdp userspace coturn"}
MORE_RATES=${MORE_RATES:-}
C=tsbench-c
S=tsbench-s
dir=$(mktemp -d)
server_pid=

cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    ip netns del "$C" 2>/dev/null || true
    ip netns del "$S" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cargo build --release --features xdp --bins >&2

for n in "$C" "$S"; do
    ip netns del "$n" 2>/dev/null || true
    ip netns add "$n"
    ip -n "$n" link set lo up
done
ip link add c0 netns "$C" type veth peer name s0 netns "$S"
ip -n "$C" addr add 198.18.0.2/24 dev c0
ip -n "$S" addr add 198.18.0.1/24 dev s0
ip -n "$S" addr add 198.18.1.1/32 dev lo
for x in "$C c0" "$S s0"; do
    set -- $x
    ip -n "$1" link set "$2" up
    ip netns exec "$1" ethtool -K "$2" tx off >/dev/null
done
ip -n "$C" route add default via 198.18.0.1
ip netns exec "$S" sysctl -qw net.ipv4.ip_forward=1
# Frames sent with XDP_TX reach a veth's far end only if it runs XDP too.
cat >"$dir/pass.c" <<'EOF'
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int pass(struct xdp_md *ctx) { return XDP_PASS; }
char LICENSE[] SEC("license") = "GPL";
EOF
clang -O2 -target bpf -I/usr/include/x86_64-linux-gnu -c "$dir/pass.c" -o "$dir/pass.o"
ip -n "$C" link set dev c0 xdp obj "$dir/pass.o" sec xdp
sysctl -qw kernel.bpf_stats_enabled=1

config() { # XDP: yes/no
    cat <<EOF
realm = "bench.local"
workers = 1
[[listen]]
transport = "udp"
address = "198.18.0.1:3478"
[relay]
address = "198.18.1.1"
ports = "2000-16000"
[auth]
users = { alice = "secret" }
[peers]
allow = ["198.18.0.0/15"]
[limits]
user_quota = 0
total_quota = 0
unauthenticated_rate = 0
[log]
level = "warn"
EOF
    [ "$1" = yes ] && printf '[xdp]\ninterfaces = ["s0"]\nmode = "native"\n'
    return 0
}

start() {
    case $1 in
    xdp | userspace)
        config "$([ "$1" = xdp ] && echo yes || echo no)" >"$dir/turnstile.toml"
        ip netns exec "$S" taskset -c 0 target/release/turnstile --config "$dir/turnstile.toml" \
            2>"$dir/$1.log" &
        ;;
    coturn)
        ip netns exec "$S" taskset -c 0 turnserver -n --listening-ip=198.18.0.1 --listening-port=3478 \
            --relay-ip=198.18.1.1 --min-port=2000 --max-port=16000 --lt-cred-mech \
            --user=alice:secret --realm=bench.local --no-cli --no-tls --no-dtls --no-tcp \
            --relay-threads=1 --total-quota=0 --user-quota=0 --log-file="$dir/coturn.log" \
            --simple-log --no-stdout-log >/dev/null 2>&1 &
        ;;
    esac
    server_pid=$!
    sleep 1.5
}

stop() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
    sleep 0.5
}

busy() { # jiffies the whole machine spent not idle
    awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat
}

prog_stats() { # run_time_ns run_cnt of the server's XDP program
    local t=0 n=0
    for f in /proc/"$server_pid"/fdinfo/*; do
        if grep -q '^prog_type:[[:space:]]*6$' "$f" 2>/dev/null; then
            t=$(awk '/^run_time_ns:/{print $2}' "$f")
            n=$(awk '/^run_cnt:/{print $2}' "$f")
        fi
    done
    echo "$t $n"
}

load() { # RATE
    ip netns exec "$C" taskset -c 1 target/release/turnstile-bench load --json --allow-remote \
        --server 198.18.0.1:3478 --client-ip 198.18.0.2 --peer-ip 198.18.0.2 \
        --server-pid "$server_pid" -k "$ALLOCS" -s "$SIZE" -r "$1" -d "$DURATION"
}

hz=$(getconf CLK_TCK)
: >"$out"
for s in $SERVERS; do
    for rate in "$RATE" $MORE_RATES 0; do
        start "$s"
        read -r t0 n0 < <(prog_stats)
        b0=$(busy)
        line=$(load "$rate") || line='{"error":true}'
        b1=$(busy)
        read -r t1 n1 < <(prog_stats)
        stop
        echo "{\"server\":\"$s\",\"machine_busy_s\":$(awk -v a="$b0" -v b="$b1" -v hz="$hz" 'BEGIN{print (b-a)/hz}'),\"prog_run_ns\":$((t1 - t0)),\"prog_runs\":$((n1 - n0)),${line#\{}" |
            tee -a "$out" >&2
    done
done

python3 - "$out" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| server | load | relayed pps | loss | machine CPU µs / relayed packet | server process CPU µs / packet | XDP program ns / packet |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("error"):
        print(f"| {r['server']} | failed | | | | | |")
        continue
    relayed = r["relayed_pps"] * r["seconds"]
    loss = 1 - r["client_received"] / r["sent"] if r["sent"] else 0
    cpu = r["machine_busy_s"] * 1e6 / relayed if relayed else 0
    prog = f"{r['prog_run_ns'] / r['prog_runs']:.0f}" if r["prog_runs"] else "—"
    load = "max" if r["target_pps"] == 0 else f"{r['target_pps']} pps"
    own = r.get("server_cpu_us_per_packet", 0)
    print(f"| {r['server']} | {load} | {r['relayed_pps']/1000:.0f}k | {loss*100:.2f} % | {cpu:.2f} | {own:.2f} | {prog} |")
EOF
