#!/usr/bin/env bash
# Builds immich-guard, installs the binary, the systemd unit and (if none exists) the example
# config, then starts the service and shows its status. Run as root from the repo.
# Without systemd (e.g. inside a container) it starts the daemon in the background instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo $0)" >&2
    exit 1
fi

cargo build --release --locked --bin immich-guard
install -D -m 0755 target/release/immich-guard /usr/local/bin/immich-guard
if [ ! -e /etc/immich-guard/config.toml ]; then
    # Everything in the example is commented out: discovery fills it all in.
    install -D -m 0644 config/immich-guard.toml /etc/immich-guard/config.toml
fi
/usr/local/bin/immich-guard check-config >/dev/null

if [ -d /run/systemd/system ]; then
    install -D -m 0644 systemd/immich-guard.service /etc/systemd/system/immich-guard.service
    systemctl daemon-reload
    systemctl enable immich-guard.service
    systemctl restart immich-guard.service
else
    echo "install.sh: systemd is not running here; starting the daemon in the background (log: /var/log/immich-guard.log)"
    if [ -S /run/immich-guard/guard.sock ] && /usr/local/bin/immich-guard status >/dev/null 2>&1; then
        pkill -TERM -x immich-guard || true
        sleep 1
    fi
    nohup /usr/local/bin/immich-guard run >>/var/log/immich-guard.log 2>&1 &
fi

for _ in $(seq 1 50); do
    /usr/local/bin/immich-guard status >/dev/null 2>&1 && break
    sleep 0.2
done
/usr/local/bin/immich-guard status
