#!/usr/bin/env bash
# Removes immich-guard: stops the service (or the daemon started outside systemd, by its pid
# file), disables and removes the unit, removes the binary, the docs and the control socket.
# Keeps the config (/etc/immich-guard) and the data dir with snapshots and incidents unless
# --purge, which asks first on a terminal and otherwise needs --yes. Safe to run again.
#
#   systemd/uninstall.sh [--purge [--yes]]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/common.sh"

purge=no
yes=no
for arg in "$@"; do
    case "$arg" in
    --purge) purge=yes ;;
    --yes | -y) yes=yes ;;
    *)
        echo "usage: $0 [--purge [--yes]]" >&2
        exit 2
        ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
read_paths

# Decide before touching anything, so a refused purge leaves everything as it was.
if [ "$purge" = yes ]; then
    doomed=("$CONFIG_DIR" "$DATA_DIR" "$DROPIN_DIR" "$LOG")
    case "$SNAPSHOT_DIR/" in
    "$DATA_DIR"/*) ;;
    *) doomed+=("$SNAPSHOT_DIR") ;;
    esac
    if [ "$yes" != yes ]; then
        [ -t 0 ] || die "--purge deletes ${doomed[*]} (config, snapshots, incidents): without a terminal to ask on, add --yes"
        read -r -p "Delete ${doomed[*]}, with every snapshot and incident? Type yes: " answer
        [ "$answer" = yes ] || die "not purging; nothing removed"
    fi
fi

if systemd_running; then
    if systemctl is-active --quiet "$UNIT_NAME"; then
        say "stopping $UNIT_NAME"
        systemctl stop "$UNIT_NAME"
    else
        say "$UNIT_NAME is not running"
    fi
fi
stop_by_pidfile

if command -v systemctl >/dev/null 2>&1 && [ -e "$UNIT" ]; then
    # Works offline too: it only removes the symlinks.
    systemctl disable "$UNIT_NAME" 2>&1 | sed "s/^/${0##*/}: /"
fi
rm -f "$WANTS_LINK"
if [ -e "$UNIT" ]; then
    rm -f "$UNIT"
    say "removed $UNIT"
else
    say "no $UNIT"
fi
if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
fi

remove() {
    local what=$1
    if [ -e "$what" ] || [ -L "$what" ]; then
        rm -rf -- "$what" || return 1
        say "removed $what"
    else
        say "no $what"
    fi
}
remove "$BIN"
remove "$DOC_DIR"
remove "$SOCKET"
rmdir "$(dirname "$SOCKET")" 2>/dev/null || true

if [ "$purge" = yes ]; then
    for path in "${doomed[@]}"; do
        # A read-only btrfs snapshot resists rm: say so rather than stop half-way.
        remove "$path" || say "could not remove all of $path (btrfs snapshots: btrfs subvolume delete DIR/storage)"
    done
else
    say "kept $CONFIG_DIR and $DATA_DIR (config, snapshots, incidents); --purge deletes them"
fi
say "done"
