#!/bin/bash
# `labctl demo`, dom0 side: dispoold under systemd with a preload pool of 2, a disposable
# handed out, and the pool refilling. Runs from the tree (/opt/dispoold/src).
set -u
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

elapsed() { echo "$SECONDS"; }

step "systemctl start dispoold (returns once the daemon reports READY)"
if ! systemctl start dispoold; then
    systemctl status --no-pager dispoold
    journalctl -b -u dispoold --no-pager | tail -n 40
    exit 1
fi
echo "dispoold is $(systemctl is-active dispoold) after $(elapsed) s"
systemctl status --no-pager --lines=0 dispoold

step "dispoolctl status (the preloads are being started)"
dispoolctl status || exit 1

step "waiting for the pool to fill (2 preloads paused, up to 120 s)"
for _ in $(seq 120); do
    [ "$(xl list | awk 'NR > 2 && $5 ~ /p/' | wc -l)" -ge 2 ] && break
    sleep 1
done
xl list
dispoolctl status || exit 1

step "dispoolctl request: a disposable is handed out"
dispoolctl request || exit 1

step "xl list and the pool status right after the hand-out"
xl list
dispoolctl status || exit 1

step "the refill: waiting for the pool to reach 2 preloads again (up to 120 s)"
for _ in $(seq 120); do
    [ "$(xl list | awk 'NR > 2 && $5 ~ /p/' | wc -l)" -ge 2 ] && break
    sleep 1
done
xl list
dispoolctl status || exit 1
echo
echo "demo done after $(elapsed) s"
