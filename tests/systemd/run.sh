#!/usr/bin/env bash
# The Debian package under a real systemd: a minimal Debian 12 tree
# (debootstrap, cached between runs) booted with systemd-nspawn, the freshly
# built .deb installed with apt, and the service's whole life cycle checked
# with systemctl, journalctl and coturn's own clients inside the container.
#
#   tests/systemd/run.sh [turnstile_VERSION_ARCH.deb]
#
# Root only (debootstrap, nspawn). Without an argument the package is built
# with `cargo deb`. The container shares the host's network namespace; the
# server listens on 127.0.0.77 only, so nothing else on the host collides.
# The last line is "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/systemd/run.sh needs root (debootstrap, systemd-nspawn)" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

DEB=${1:-}
if [ -z "$DEB" ]; then
    command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
    DEB=$(cargo deb --quiet | grep '\.deb$' | tail -1)
fi
DEB=$(realpath "$DEB")

# The base tree, built once per machine: systemd, and coturn for its test
# clients (its own server masked: it would take port 3478 of the host).
CACHE=${TURNSTILE_SYSTEMD_CACHE:-/var/cache/turnstile-tests}
BASE=$CACHE/bookworm
if [ ! -e "$BASE/.complete" ]; then
    rm -rf "$BASE"
    mkdir -p "$CACHE"
    # The mirror this machine's apt uses.
    MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
    echo "debootstrap bookworm from $MIRROR into $BASE (once per machine)"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,coturn \
        bookworm "$BASE" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1
    ln -sf /dev/null "$BASE/etc/systemd/system/coturn.service"
    touch "$BASE/.complete"
fi

WORK=$(mktemp -d)
cp "$DEB" "$WORK/turnstile.deb"
NSPAWN=
LEADER=
cleanup() {
    if [ -n "$LEADER" ]; then
        nsenter -t "$LEADER" -a systemctl poweroff >/dev/null 2>&1 || true
    fi
    if [ -n "$NSPAWN" ]; then
        for _ in $(seq 50); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
        kill "$NSPAWN" 2>/dev/null || true
        wait "$NSPAWN" 2>/dev/null || true
    fi
    # What nspawn leaves behind without a host systemd: cgroup trees,
    # removed leaves first.
    find /sys/fs/cgroup -maxdepth 3 -type d \( -name payload -o -name supervisor \) -print 2>/dev/null |
        while read -r d; do find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true; done
    rm -rf /run/systemd/nspawn "$WORK"
}
trap cleanup EXIT

systemd-nspawn -q -D "$BASE" -b --register=no --keep-unit --volatile=overlay \
    --bind-ro="$WORK:/srv/test" >"$WORK/console.log" 2>&1 &
NSPAWN=$!
# The container's PID 1 (systemd), a child of nspawn.
for _ in $(seq 100); do
    LEADER=$(pgrep -P "$NSPAWN" -x systemd | head -1 || true)
    [ -n "$LEADER" ] && break
    sleep 0.1
done
[ -n "$LEADER" ] || { echo "the container did not boot"; cat "$WORK/console.log"; exit 1; }
in_ct() { nsenter -t "$LEADER" -a "$@"; }
in_ct systemctl is-system-running --wait >/dev/null 2>&1 || true

passed=0
failed=0
check() {
    local name=$1
    shift
    if "$@"; then
        echo "ok - $name"
        passed=$((passed + 1))
    else
        echo "FAIL - $name"
        failed=$((failed + 1))
    fi
}

svc() { in_ct systemctl show -p "$1" --value turnstile; }
main_user() { in_ct ps -o user= -p "$(svc MainPID)" | tr -d ' '; }

# 1. Install: the shipped configuration needs the operator's public address,
#    so the service is installed but neither started nor failed.
in_ct apt-get install -y -qq /srv/test/turnstile.deb >"$WORK/install.log" 2>&1 || cat "$WORK/install.log"
check "the package installs with apt" in_ct test -x /usr/bin/turnstile
check "the turnstile system user exists" in_ct getent passwd turnstile
check "install says what to edit" grep -q "external_address" "$WORK/install.log"
check "no failed unit on the unedited configuration" \
    test "$(svc ActiveState)" = inactive
check "the configuration is a conffile" \
    bash -c "nsenter -t $LEADER -a dpkg-query -W -f='\${Conffiles}' turnstile | grep -q /etc/turnstile/turnstile.toml"

# 2. The operator's configuration; a short watchdog period for the test.
cat >"$WORK/turnstile.toml" <<'EOF'
realm = "systemd.test"
workers = 2

[[listen]]
transport = "udp"
address = "127.0.0.77:3478"

[[listen]]
transport = "tcp"
address = "127.0.0.77:3478"

# A privileged port: bound thanks to the unit's ambient CAP_NET_BIND_SERVICE.
[[listen]]
transport = "tcp"
address = "127.0.0.77:443"

[relay]
address = "127.0.0.77"
ports = "40000-40199"

[auth]
users = { alice = "secret" }

[peers]
allow = ["127.0.0.0/8"]

[server]
pid_file = "/run/turnstile/turnstile.pid"
EOF
in_ct install -m 640 -g turnstile /srv/test/turnstile.toml /etc/turnstile/turnstile.toml
in_ct mkdir -p /etc/systemd/system/turnstile.service.d
printf '[Service]\nWatchdogSec=2\n' >"$WORK/watchdog.conf"
in_ct cp /srv/test/watchdog.conf /etc/systemd/system/turnstile.service.d/watchdog.conf
in_ct systemctl daemon-reload

# 3. Start: systemctl returns once the server said READY, and it answers at once.
check "systemctl enable --now succeeds" in_ct systemctl enable --now turnstile
check "it answers STUN as soon as start returns" \
    bash -c "nsenter -t $LEADER -a turnutils_stunclient -p 3478 127.0.0.77 2>&1 | grep -q 'UDP reflexive addr'"
check "the main process runs as turnstile" test "$(main_user)" = turnstile
check "it bound port 443 without root (ambient capability)" \
    bash -c "exec 3<>/dev/tcp/127.0.0.77/443"
in_ct bash -c 'turnutils_peer -p 40400 -L 127.0.0.77 >/dev/null 2>&1 & echo $! >/run/peer.pid'
sleep 0.3
# coturn's client: USER PASSWORD MESSAGES, its report into $WORK/uclient-USER.log.
uclient() {
    in_ct timeout 60 turnutils_uclient -u "$1" -w "$2" -e 127.0.0.77 -r 40400 -p 3478 -n "$3" -l 100 -m 2 \
        127.0.0.77 >"$WORK/uclient-$1.log" 2>&1 || true
}
no_loss() { grep -q 'Total lost packets 0 (0.000000%)' "$1"; }
uclient alice secret 50
check "a TURN allocation relays (turnutils_uclient)" no_loss "$WORK/uclient-alice.log"

# 4. Reload with a new user, an allocation relaying throughout.
in_ct timeout 60 turnutils_uclient -u alice -w secret -e 127.0.0.77 -r 40400 -p 3478 -n 300 -l 100 -m 2 \
    127.0.0.77 >"$WORK/long.log" 2>&1 &
LONG=$!
sleep 1
in_ct sed -i 's/users = { alice = "secret" }/users = { alice = "secret", bob = "hunter2" }/' /etc/turnstile/turnstile.toml
check "systemctl reload succeeds" in_ct systemctl reload turnstile
uclient bob hunter2 20
check "the new user allocates after the reload" no_loss "$WORK/uclient-bob.log"
wait "$LONG" || true
check "an allocation made before the reload relayed through it with no loss" no_loss "$WORK/long.log"

# 4b. Live upgrade with an allocation relaying throughout: systemd follows the
#     new main process, the unit stays active, nothing is lost.
in_ct timeout 60 turnutils_uclient -u alice -w secret -e 127.0.0.77 -r 40400 -p 3478 -n 300 -l 100 -m 2 \
    127.0.0.77 >"$WORK/upgrade.log" 2>&1 &
LONG=$!
sleep 1
BEFORE=$(svc MainPID)
check "turnstile upgrade hands over to a new process" \
    in_ct /usr/bin/turnstile --config /etc/turnstile/turnstile.toml upgrade
AFTER=$(svc MainPID)
check "systemd follows the new main PID" \
    bash -c "[ '$AFTER' != '$BEFORE' ] && [ '$AFTER' = \"\$(nsenter -t $LEADER -a cat /run/turnstile/turnstile.pid)\" ]"
check "the unit stays active through the upgrade" test "$(svc ActiveState)" = active
check "the new main process runs as turnstile" test "$(main_user)" = turnstile
wait "$LONG" || true
check "an allocation relayed across the live upgrade with no loss" no_loss "$WORK/upgrade.log"
check "the old process is gone" bash -c "! nsenter -t $LEADER -a kill -0 $BEFORE 2>/dev/null"

# 5. The watchdog: three periods pass quietly; a hung server is restarted.
sleep 7
check "still active after three watchdog periods" test "$(svc ActiveState)" = active
check "no restart while it answers the watchdog (the upgraded process too)" test "$(svc NRestarts)" = 0
OLD=$(svc MainPID)
in_ct kill -STOP "$OLD"
for _ in $(seq 100); do
    [ "$(svc NRestarts)" != 0 ] && [ "$(svc ActiveState)" = active ] && break
    sleep 0.2
done
check "a hung server is restarted by systemd" test "$(svc NRestarts)" = 1
check "the restarted server is a new process and answers" \
    bash -c "[ $(svc MainPID) != $OLD ] && nsenter -t $LEADER -a turnutils_stunclient -p 3478 127.0.0.77 2>&1 | grep -q 'UDP reflexive addr'"

# 6. Stop drains and succeeds; the journal holds what an operator reads.
check "systemctl stop" in_ct systemctl stop turnstile
check "it stopped with Result=success" test "$(svc Result)" = success
in_ct journalctl -u turnstile --no-pager >"$WORK/journal.log" 2>&1 || true
check "the journal holds the start-up lines" grep -q "listening udp 127.0.0.77:3478" "$WORK/journal.log"
check "the journal holds the allocation lines" grep -q "allocation created" "$WORK/journal.log"
check "the journal holds the watchdog restart" grep -qi "watchdog timeout" "$WORK/journal.log"
score=$(in_ct systemd-analyze security turnstile --no-pager 2>/dev/null | grep -i "overall exposure level" || true)
echo "# systemd-analyze security: ${score:-not reported}"
check "systemd-analyze security reports an exposure score" test -n "$score"

# 7. Remove keeps the configuration; purge removes it. No unit is left.
in_ct apt-get remove -y -qq turnstile >/dev/null 2>&1
check "remove: the unit is gone" bash -c "! nsenter -t $LEADER -a test -e /lib/systemd/system/turnstile.service"
check "remove: the configuration stays" in_ct test -e /etc/turnstile/turnstile.toml
in_ct apt-get purge -y -qq turnstile >/dev/null 2>&1
check "purge: the configuration is gone" bash -c "! nsenter -t $LEADER -a test -e /etc/turnstile"
check "purge: systemd knows no turnstile unit" \
    bash -c "! nsenter -t $LEADER -a systemctl cat turnstile >/dev/null 2>&1"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
