#!/bin/bash
# Checks the lab's emulated CPU for the dom0 data corruption in lab/README.md (Known
# problems), with xl alone: for each variant, create guest A and wait until it is ready,
# do the variant's step, then create guest B (paused). Prints "VARIANT v: OK" or why B
# failed. Run: lab/labctl run -- bash lab/dom0/corruption-probe.sh
# (DISPOOLD_LAB_QEMU_CPU=max lab/labctl run ... to see the fault with XSAVE).
set -u
G=/var/lib/dispoold-lab/guest
W=$(mktemp -d)
head -c 2500 /dev/urandom >"$W/garbage"
cfg() { # name kernel
    printf 'name="%s"\ntype="pv"\nkernel="%s"\nramdisk="%s/initrd.img"\nmemory=128\nmaxmem=256\n' \
        "$1" "$2" "$G" >"$W/$1.cfg"
    echo 'extra="console=hvc0 rdinit=/sbin/init quiet"' >>"$W/$1.cfg"
}
ready() { # name: until the guest wrote data/ready (5 min at most)
    local id i
    id=$(xl domid "$1") || return 1
    for i in $(seq 600); do
        [ "$(xenstore-read "/local/domain/$id/data/ready" 2>/dev/null)" = 1 ] && return 0
        sleep 0.5
    done
    return 1
}
sha256sum "$G/vmlinuz"
n=0 failures=0
for v in ${VARIANTS:-plain pause balloon failed failed failed plain}; do
    n=$((n + 1))
    cfg "a$n" "$G/vmlinuz"; cfg "b$n" "$G/vmlinuz"; cfg "m$n" /nonexistent; cfg "g$n" "$W/garbage"
    timeout 300 xl create -q "$W/a$n.cfg" && ready "a$n" || echo "VARIANT $v: guest A failed"
    case $v in
        pause) xl pause "a$n"; xl unpause "a$n" ;;
        balloon) xl mem-set "a$n" 96; sleep 8 ;;
        failed) xl create -q "$W/m$n.cfg" 2>/dev/null; xl create -q "$W/g$n.cfg" 2>/dev/null ;;
    esac
    if timeout 300 xl create -q -p "$W/b$n.cfg" 2>"$W/err"; then
        echo "VARIANT $v: OK"
    else
        echo "VARIANT $v: B FAILED: $(grep -m1 -o 'error: .*' "$W/err")"
        failures=$((failures + 1))
    fi
    xl destroy "a$n" 2>/dev/null; xl destroy "b$n" 2>/dev/null
done
sha256sum "$G/vmlinuz"
exit $((failures > 0))
