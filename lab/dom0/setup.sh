#!/bin/bash
# Runs inside the dom0 root filesystem (chroot) at the end of `labctl build`, for both the
# booted image (VARIANT=runtime) and its build variant (VARIANT=build).
# /tmp/lab holds wheels/ (with requirements.txt). The lab's job runner (lab/dom0/rootfs/)
# is not baked in: labctl adds it to each run's layer.
set -euo pipefail
variant=$1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

# Python: a venv that sees Debian's python3-systemd, filled from wheels the host's pip
# downloaded (pip in the chroot has no network and no CA bundle).
python3 -m venv --system-site-packages /opt/dispoold/venv
/opt/dispoold/venv/bin/pip install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/lab/wheels -r /tmp/lab/wheels/requirements.txt
/opt/dispoold/venv/bin/python -c 'import pydantic, msgpack, psutil, cffi, systemd.daemon, pytest'

# dispoold's default client group
getent group qubes >/dev/null || groupadd --system qubes

# A fixed identity: an initramfs root has no persistent /etc, and an empty machine-id
# would make every boot a "first boot" (systemd-firstboot, presets).
echo dom0 > /etc/hostname
systemd-machine-id-setup >/dev/null 2>&1 || true
passwd -d root >/dev/null

if [ "$variant" = build ]; then
    exit 0
fi

# dom0 has no network: pip is of no use there, and setuptools only served the build variant
/opt/dispoold/venv/bin/python -m pip uninstall --quiet --yes pip setuptools
# What a throw-away dom0 never reads: udev's hardware database, the wheels venv creation
# uses, Xen's PV shim (for HVM guests).
rm -rf /usr/lib/udev/hwdb.d /usr/lib/udev/hwdb.bin /usr/share/python-wheels \
    /usr/lib/xen-4.17/boot

# Guest console logs (xenconsoled), read by tests and collected into results/_lab/.
mkdir -p /var/log/xen/console
if grep -q '^#\?XENCONSOLED_TRACE=' /etc/default/xen 2>/dev/null; then
    sed -i 's/^#\?XENCONSOLED_TRACE=.*/XENCONSOLED_TRACE=guest/' /etc/default/xen
else
    echo 'XENCONSOLED_TRACE=guest' >> /etc/default/xen
fi
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >> /etc/default/xen

# Boot time under emulation is the lab's main cost: mask what a throw-away dom0 in an
# initramfs never needs (timers, first-boot and update checks, consoles the lab drives
# itself, logins, xendomains' save/restore of guests at shutdown). udev keeps running for
# events, but the coldplug trigger goes: xen.service and the runner load their modules,
# libxl runs its own hotplug scripts, and devtmpfs makes /dev/xen/*.
systemctl mask --quiet \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer systemd-tmpfiles-clean.timer \
    getty@tty1.service serial-getty@hvc0.service console-getty.service getty-static.service \
    systemd-firstboot.service systemd-machine-id-commit.service systemd-hwdb-update.service \
    ldconfig.service systemd-update-done.service systemd-update-utmp.service \
    systemd-update-utmp-runlevel.service systemd-random-seed.service systemd-pstore.service \
    systemd-binfmt.service proc-sys-fs-binfmt_misc.automount systemd-remount-fs.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount \
    dev-hugepages.mount modprobe@drm.service modprobe@fuse.service \
    systemd-journal-flush.service xendomains.service e2scrub_reap.service \
    systemd-udev-trigger.service systemd-logind.service systemd-user-sessions.service \
    modprobe@dm_mod.service modprobe@configfs.service modprobe@efi_pstore.service \
    sys-kernel-config.mount dev-mqueue.mount systemd-sysusers.service \
    kmod-static-nodes.service systemd-modules-load.service \
    2>/dev/null || true
