#!/usr/bin/env bash
# The whole test suite, with everything it needs, on a fresh Debian machine
# with Rust: the system packages the tests drive (coturn's clients, Debian's
# chromium, node and npm for playwright-core, systemd's tools), the browser
# driver from npm, then formatting, lints, the fuzz targets' build and every
# test (with the xdp feature), and, as root, the Debian package under a real systemd
# (tests/systemd/run.sh). Run as root or as a user with sudo; CI runs exactly
# this.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

export DEBIAN_FRONTEND=noninteractive
# coturn ships turnutils_stunclient / turnutils_uclient / turnutils_peer, the
# interop clients; chromium runs the WebRTC calls (never a downloaded
# browser); nodejs/npm drive it with playwright-core; systemd-analyze checks
# the unit.
need=()
command -v turnutils_stunclient >/dev/null 2>&1 || need+=(coturn)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v timeout >/dev/null 2>&1 || need+=(coreutils)
# fail2ban-regex checks the shipped filter against real log lines.
command -v fail2ban-regex >/dev/null 2>&1 || need+=(fail2ban)
# The XDP fast path: clang builds the eBPF program (libbpf-dev has its
# headers, llvm the object tools); ethtool turns checksum offload off on the
# test's veth pairs.
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v llvm-objdump >/dev/null 2>&1 || need+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The fleet store's tests start a real Redis.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features xdp -- -D warnings
# The fuzz targets must never rot; building them needs no nightly toolchain.
# (Not --locked: the fuzz lock file follows the main crate's dependencies.)
cargo build --manifest-path fuzz/Cargo.toml --bins

# Every test, with a one-line total at the end.
log=$(mktemp)
set +e
# With the XDP fast path built in: its tests (tests/xdp.rs) need root and
# skip without it; everything else runs either way.
cargo test --all-targets --locked --features xdp 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"

# The Debian package under a real systemd (root only: debootstrap and
# systemd-nspawn; the Debian tree is cached between runs on one machine).
if [ "$(id -u)" -eq 0 ]; then
    command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet
    # cargo deb prints the paths of what it built (under the target directory).
    deb=$(cargo deb --quiet | grep '\.deb$' | tail -1)
    set +e
    bash tests/systemd/run.sh "$deb" 2>&1 | tee "$log"
    systemd_status=${PIPESTATUS[0]}
    set -e
    line=$(tail -1 "$log")
    rm -f "$log"
    passed=$((passed + $(echo "$line" | awk '{print $1+0}')))
    failed=$((failed + $(echo "$line" | awk '{print $3+0}')))
    [ "$systemd_status" -eq 0 ] || status=1
else
    echo "tests/systemd/run.sh skipped: it needs root (debootstrap, systemd-nspawn)"
fi

echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
