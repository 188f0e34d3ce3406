# Shared by install.sh and uninstall.sh (sourced, not run). Paths, step printing, and
# stopping a daemon that runs outside systemd by its pid file, never by process name.
# shellcheck shell=bash
# The paths are read by the scripts that source this file.
# shellcheck disable=SC2034

BIN=/usr/local/bin/immich-guard
UNIT_NAME=immich-guard.service
UNIT=/etc/systemd/system/$UNIT_NAME
DROPIN_DIR=/etc/systemd/system/$UNIT_NAME.d
WANTS_LINK=/etc/systemd/system/multi-user.target.wants/$UNIT_NAME
CONFIG_DIR=/etc/immich-guard
CONFIG=$CONFIG_DIR/config.toml
DOC_DIR=/usr/local/share/doc/immich-guard
LOG=/var/log/immich-guard.log
# Overwritten by read_paths from the effective config.
DATA_DIR=/var/lib/immich-guard
SOCKET=/run/immich-guard/guard.sock
SNAPSHOT_DIR=$DATA_DIR/snapshots

say() { echo "${0##*/}: $*"; }
die() {
    echo "${0##*/}: $*" >&2
    exit 1
}

systemd_running() { [ -d /run/systemd/system ]; }

# The data dir, socket and snapshot dir the installed binary reads from the config (the
# defaults when it is not installed or the config does not parse).
read_paths() {
    local effective
    [ -x "$BIN" ] || return 0
    effective=$("$BIN" check-config 2>/dev/null) || return 0
    DATA_DIR=$(sed -n 's/^data_dir = "\(.*\)"$/\1/p' <<<"$effective" | head -n1)
    SOCKET=$(sed -n 's/^socket = "\(.*\)"$/\1/p' <<<"$effective" | head -n1)
    SNAPSHOT_DIR=$(sed -n 's/^dir = "\(.*\)"$/\1/p' <<<"$effective" | head -n1)
    DATA_DIR=${DATA_DIR:-/var/lib/immich-guard}
    SOCKET=${SOCKET:-/run/immich-guard/guard.sock}
    SNAPSHOT_DIR=${SNAPSHOT_DIR:-$DATA_DIR/snapshots}
}

# The daemon writes its pid to <data_dir>/daemon.pid and holds an exclusive flock on it while
# it runs. Prints the pid of a running immich-guard daemon, or nothing.
running_pid() {
    local pidfile=$DATA_DIR/daemon.pid pid exe
    [ -f "$pidfile" ] || return 0
    # A lock we can take means nobody holds it: the file is left over.
    flock -n "$pidfile" true 2>/dev/null && return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] || return 0
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
    exe=${exe% (deleted)}
    if [ "${exe##*/}" != immich-guard ]; then
        say "pid $pid from $pidfile is $exe, not immich-guard: not touching it" >&2
        return 0
    fi
    echo "$pid"
}

# SIGTERM to the daemon named by the pid file, then wait for it to exit (it sends STOPPING and
# removes its socket on the way out).
stop_by_pidfile() {
    local pid
    pid=$(running_pid)
    if [ -z "$pid" ]; then
        say "no daemon running outside systemd (no locked pid file in $DATA_DIR)"
        return 0
    fi
    say "stopping the daemon (pid $pid, from $DATA_DIR/daemon.pid) with SIGTERM"
    kill -TERM "$pid"
    for _ in $(seq 1 300); do
        # Its lock goes with its last descriptor, even before its parent reaps it.
        if ! [ -e "/proc/$pid" ] || flock -n "$DATA_DIR/daemon.pid" true 2>/dev/null; then
            say "daemon $pid stopped"
            return 0
        fi
        sleep 0.1
    done
    die "daemon $pid did not stop within 30 s; stop it (kill -KILL $pid) and run this again"
}
