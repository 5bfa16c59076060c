#!/bin/sh
# /init of nkvm's Linux test guest (busybox): report, exercise the virtio
# disk, power off. `nkvm.shell` on the kernel command line gives a shell.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "NKVM-GUEST: init started"
echo "NKVM-GUEST: cpus online: $(cat /sys/devices/system/cpu/online) ($(grep -c ^processor /proc/cpuinfo) processors)"
while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null || echo "NKVM-GUEST: insmod $m failed"
done < /lib/modules/load-order
sleep 1
if [ -b /dev/vda ]; then
  if dd if=/dev/vda bs=512 count=1 2>/dev/null | grep -q NKVM-DISK-TEST; then
    echo NKVM-GUEST-WROTE-THIS | dd of=/dev/vda bs=4096 seek=1 conv=notrunc,fsync 2>/dev/null
    sync
    echo "NKVM-GUEST: disk ok"
  else
    echo "NKVM-GUEST: disk FAILED: no marker in sector 0"
  fi
else
  echo "NKVM-GUEST: disk FAILED: no /dev/vda"
fi
echo "NKVM-GUEST: done"
if grep -q nkvm.shell /proc/cmdline; then exec sh; fi
poweroff -f
