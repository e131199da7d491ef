#!/bin/bash
# `labctl demo`, dom0 side: dispoold as a systemd service with a preload pool of 2
# (lab/dom0/dispoold.toml: template lab-dvm, guests from the lab's image), a disposable
# handed out, and the pool refilling. Runs from the tree (/opt/dispoold/src).
set -u
TEMPLATE=lab-dvm
POOL=2
FILL_TIMEOUT=900   # seconds; a guest boot under emulation on a busy host can take minutes

step() { printf '\n== [%4d s] %s\n' "$SECONDS" "$*"; }

# paused_preloads: how many of the template's disposables are preloaded and paused
paused_preloads() {
    dispoolctl --json status "$TEMPLATE" 2>/dev/null | python3 -c '
import json, sys
status = json.loads(sys.stdin.read() or "{}")
print(sum(1 for t in status.get("templates", []) for d in t["disposables"]
          if d["stage"] == "paused"))' 2>/dev/null || echo 0
}

wait_for_pool() {
    local deadline=$((SECONDS + FILL_TIMEOUT)) n
    while :; do
        n=$(paused_preloads)
        [ "$n" -ge "$POOL" ] && return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "the pool did not reach $POOL paused preloads within ${FILL_TIMEOUT}s"
            journalctl -b -u dispoold --no-pager -n 40
            return 1
        fi
        sleep 2
    done
}

step "systemctl start dispoold (returns once the daemon reports READY to systemd)"
if ! systemctl start dispoold; then
    systemctl status --no-pager dispoold
    journalctl -b -u dispoold --no-pager -n 60
    exit 1
fi
systemctl status --no-pager --lines=0 dispoold

step "dispoolctl status: preloading has begun"
dispoolctl status || exit 1

step "waiting for $POOL preloads to be up and paused"
wait_for_pool || exit 1
dispoolctl status || exit 1
xl list

step "dispoolctl request: a disposable is handed out (unpaused, ready for use)"
name=$(dispoolctl request "@dispvm:$TEMPLATE") || exit 1
echo "got: $name"
xl list "$name"

step "dispoolctl status right after the hand-out: the pool refills"
dispoolctl status || exit 1

step "waiting for the refill"
wait_for_pool || exit 1
dispoolctl status || exit 1
xl list

step "demo done"
