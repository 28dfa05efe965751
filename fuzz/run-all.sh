#!/usr/bin/env bash
# Runs every fuzz target for RUNS executions (default 10 million; capped at
# MAX_SECONDS each) on its corpus and prints libFuzzer's totals. Long runs
# are a separate, documented command, not part of CI:
#
#   cd fuzz && ./run-all.sh            # about 20 minutes on one core
#   RUNS=100000000 ./run-all.sh        # longer
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-10000000}
MAX_SECONDS=${MAX_SECONDS:-3600}
TARGETS=${TARGETS:-"message framer channel_data proxy_protocol peer_policy http_request server_sequence"}
for t in $TARGETS; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    # Event sequences: 256 bytes is ~100 events; longer inputs only slow the search.
    extra=()
    if [ "$t" = server_sequence ]; then extra=(-max_len=256); fi
    if cargo fuzz run -s none "$t" "corpus/$t" -- -runs="$RUNS" -max_total_time="$MAX_SECONDS" "${extra[@]}" >"$log" 2>&1; then
        echo "$t: $(grep -E '^Done' "$log" | tail -1), 0 crashes"
    else
        echo "$t: FAILED — see fuzz/artifacts/$t"; tail -30 "$log"
    fi
    rm -f "$log"
done
