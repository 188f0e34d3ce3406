#!/usr/bin/env bash
# Installs immich-guard: the binary (built with cargo, or --binary PATH), the systemd unit
# (enabled, also when systemd is not running here so a later boot starts it), the example
# config if none exists, and this repo's docs; then (re)starts the daemon and shows its status.
# Without systemd (e.g. inside a container) the daemon is started in the background, and a
# running one is restarted by its pid file. Safe to run again (an upgrade). Run as root.
#
#   systemd/install.sh [--binary PATH]
#   systemd/install.sh --uninstall [--purge [--yes]]     (same as systemd/uninstall.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source-path=SCRIPTDIR
. "$here/common.sh"

usage() {
    echo "usage: $0 [--binary PATH] | --uninstall [--purge [--yes]]" >&2
    exit 2
}

binary=
while [ $# -gt 0 ]; do
    case "$1" in
    --binary)
        [ $# -ge 2 ] || usage
        binary=$2
        shift 2
        ;;
    --uninstall)
        shift
        exec "$here/uninstall.sh" "$@"
        ;;
    -h | --help) usage ;;
    *)
        echo "${0##*/}: unknown option $1" >&2
        usage
        ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"

if [ -z "$binary" ]; then
    # sudo often resets PATH, and root may have no Rust toolchain at all.
    command -v cargo >/dev/null 2>&1 ||
        die "cargo is not on root's PATH: build as yourself (cargo build --release --locked) and run: sudo $0 --binary target/release/immich-guard"
    say "building: cargo build --release --locked --bin immich-guard"
    (cd "$repo" && cargo build --release --locked --bin immich-guard)
    binary=$repo/target/release/immich-guard
fi
if ! [ -f "$binary" ] || ! [ -x "$binary" ]; then
    die "--binary $binary: not an executable file"
fi

# A new file renamed over the old one: a running daemon keeps its inode, nothing is half-written.
install -D -m 0755 "$binary" "$BIN.new"
mv -f "$BIN.new" "$BIN"
say "installed $BIN ($("$BIN" --version))"

if [ -e "$CONFIG" ]; then
    say "kept $CONFIG"
else
    # Everything in the example is commented out: discovery fills it all in.
    install -D -m 0644 "$repo/config/immich-guard.toml" "$CONFIG"
    say "installed the example config at $CONFIG (every key commented out)"
fi
"$BIN" check-config >/dev/null || die "$CONFIG does not check out (immich-guard check-config above); fix it and run this again"
read_paths

install -d -m 0755 "$DOC_DIR"
install -m 0644 "$repo/README.md" "$repo"/docs/*.md "$DOC_DIR/"
say "installed the docs (runbooks included) in $DOC_DIR"

install -D -m 0644 "$repo/systemd/$UNIT_NAME" "$UNIT"
say "installed $UNIT"

if systemd_running; then
    systemctl daemon-reload
    systemctl enable "$UNIT_NAME" 2>&1 | sed "s/^/${0##*/}: /"
    say "enabled $UNIT_NAME"
    # One left running by hand would hold the data dir's lock and the socket; the service's
    # own daemon also writes the pid file, and systemd restarts that one below.
    by_hand=$(running_pid)
    if [ -n "$by_hand" ] && [ "$by_hand" != "$(systemctl show -p MainPID --value "$UNIT_NAME")" ]; then
        stop_by_pidfile
    fi
    if systemctl is-active --quiet "$UNIT_NAME"; then
        say "restarting $UNIT_NAME"
        systemctl restart "$UNIT_NAME"
    else
        say "starting $UNIT_NAME"
        systemctl start "$UNIT_NAME"
    fi
    systemctl status --no-pager --lines=5 "$UNIT_NAME" || true
    stop_hint="systemctl stop immich-guard"
else
    # Offline: systemctl enable only makes the symlinks, which a later boot follows.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl enable "$UNIT_NAME" 2>&1 | sed "s/^/${0##*/}: /"
    else
        mkdir -p "$(dirname "$WANTS_LINK")"
        ln -sfn "$UNIT" "$WANTS_LINK"
    fi
    say "enabled $UNIT_NAME for the next boot with systemd ($WANTS_LINK)"
    say "systemd is not running here: starting the daemon in the background (log: $LOG)"
    stop_by_pidfile
    if [ -S "$SOCKET" ] && "$BIN" status >/dev/null 2>&1; then
        die "a daemon answers on $SOCKET but holds no pid file in $DATA_DIR (an older version?): stop it yourself and run this again"
    fi
    (
        umask 077
        cd /
        nohup setsid "$BIN" run >>"$LOG" 2>&1 </dev/null &
    )
    for _ in $(seq 1 100); do
        "$BIN" status >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$BIN" status >/dev/null 2>&1 || die "the daemon did not come up within 10 s: see $LOG"
    pid=$(running_pid)
    say "daemon running${pid:+, pid $pid}"
    stop_hint="kill -TERM \$(cat $DATA_DIR/daemon.pid)"
fi

for _ in $(seq 1 50); do
    "$BIN" status >/dev/null 2>&1 && break
    sleep 0.2
done
"$BIN" status || true

cat <<EOF

Installed. To stop the daemon: $stop_hint
To remove it: $here/uninstall.sh (keeps $CONFIG_DIR and $DATA_DIR);
              $here/uninstall.sh --purge (also deletes them: config, snapshots, incidents).
EOF
