#!/bin/busybox sh
# /init of the guest's initramfs: mount the host's root read-only over 9p with a tmpfs
# overlay on top, make that the root (switch_root, so the kernel's module autoloading
# runs the host's modprobe) and run /kproxy-out/run.sh (written by the host), which
# writes its exit code to /kproxy-out/rc and powers the guest off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod "/modules/$m.ko" 2>/dev/null || echo "guest-init: insmod $m failed"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
  || { echo "guest-init: cannot mount the host root"; poweroff -f; }
mount -t tmpfs -o size=75% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
  || { echo "guest-init: overlay mount failed"; poweroff -f; }
mkdir -p /newroot/kproxy-out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot/kproxy-out
for d in proc sys dev; do mount --move /$d /newroot/$d; done
echo "guest-init: running /kproxy-out/run.sh"
exec switch_root /newroot /bin/sh /kproxy-out/run.sh
