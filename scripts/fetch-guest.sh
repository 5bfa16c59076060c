#!/usr/bin/env bash
# Fetches Debian's stock cloud kernel and busybox-static with apt-get download,
# unpacks them under OUTDIR (default target/guest; never into /boot, nothing is
# installed), and builds an initramfs and a small disk image for nkvm's Linux
# guest. Idempotent: a rerun reuses what is there.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/target/guest}" && cd "${1:-$root/target/guest}" && pwd)
say() { echo "fetch-guest: $*"; }
die() { echo "fetch-guest: error: $*" >&2; exit 1; }
# One run at a time per output directory (parallel test binaries may all ask).
exec 9>"$out/.lock"
flock 9 || die "cannot lock $out/.lock"

command -v apt-get >/dev/null || die "apt-get is needed (a Debian or Ubuntu host)"
missing=()
for tool in cpio:cpio gzip:gzip xz:xz-utils zstd:zstd lz4:lz4 dpkg-deb:dpkg depmod:kmod; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || [ ${#missing[@]} -gt 0 ]; then
  say "apt-get update"
  apt-get update -qq || die "apt-get update failed"
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null || die "cannot install ${missing[*]}"
fi

kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kpkg" ] || die "cannot resolve the versioned package behind linux-image-cloud-amd64"
kver=${kpkg#linux-image-}

mkdir -p "$out/debs"
cd "$out/debs"
for pkg in "$kpkg" busybox-static; do
  if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
    say "apt-get download $pkg"
    apt-get download -qq "$pkg" || die "apt-get download $pkg failed"
  fi
done

unpacked="$out/unpacked"
if [ ! -f "$unpacked/boot/vmlinuz-$kver" ]; then
  say "unpacking $kpkg and busybox-static under $unpacked"
  rm -rf "$unpacked"
  mkdir -p "$unpacked"
  for deb in "$kpkg"_*.deb busybox-static_*.deb; do dpkg-deb -x "$deb" "$unpacked"; done
fi
cp "$unpacked/boot/vmlinuz-$kver" "$out/bzImage"
# The uncompressed ELF vmlinux, cut out of the bzImage's payload (boot
# protocol >= 2.08: payload_offset at 0x248, payload_length at 0x24c, after
# the (setup_sects + 1) * 512 bytes of real-mode setup). Booting it skips the
# decompressor, which runs slowly at low addresses on nested hosts.
if [ ! -s "$out/vmlinux" ] || [ "$out/vmlinux" -ot "$out/bzImage" ]; then
  u8() { od -An -tu1 -j "$1" -N1 "$out/bzImage" | tr -d ' '; }
  u32() { od -An -tu4 -j "$1" -N4 "$out/bzImage" | tr -d ' '; }
  sects=$(u8 $((0x1f1))); [ "$sects" -eq 0 ] && sects=4
  start=$(( (sects + 1) * 512 + $(u32 $((0x248))) ))
  len=$(u32 $((0x24c)))
  magic=$(od -An -tx1 -j "$start" -N4 "$out/bzImage" | tr -d ' ')
  case "$magic" in
    02214c18) unpack="lz4 -dc" ;;
    fd377a58) unpack="xz -dc" ;;
    28b52ffd) unpack="zstd -qdc" ;;
    1f8b*) unpack="gzip -dc" ;;
    *) die "unknown bzImage payload compression (magic $magic)" ;;
  esac
  # lz4's legacy frame has no end marker: it reports the trailing size
  # word as garbage after writing everything; the ELF check below decides.
  tail -c +$((start + 1)) "$out/bzImage" | head -c "$len" | $unpack > "$out/vmlinux" 2>/dev/null || true
  [ "$(od -An -tx1 -N4 "$out/vmlinux" | tr -d ' ')" = 7f454c46 ] || die "could not extract vmlinux from the bzImage"
fi

# The package ships no modules.dep (depmod runs at install): make one.
modroot="$unpacked/lib/modules/$kver"
[ -f "$modroot/modules.dep" ] || depmod -b "$unpacked" "$kver" || die "depmod failed"
echo "$kver" > "$out/kernel-version"

# The initramfs: busybox, the virtio modules and their dependencies, /init.
wanted="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console"
initrd="$out/initramfs"
rm -rf "$initrd"
mkdir -p "$initrd"/{bin,sbin,proc,sys,dev,mnt,lib/modules}
cp "$unpacked/bin/busybox" "$initrd/bin/busybox"
for applet in $("$initrd/bin/busybox" --list); do
  [ -e "$initrd/bin/$applet" ] || ln -s busybox "$initrd/bin/$applet"
done
# Resolve dependencies from modules.dep, in load order.
order=()
add_module() {
  local name=$1 path dep
  path=$(awk -F: -v n="$name" '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/-/, "_", f); if (f == n) { print $1; exit } }' "$modroot/modules.dep")
  if [ -z "$path" ]; then say "module $name not found (built in?)"; return; fi
  for dep in $(awk -F: -v p="$path" '$1 == p { print $2 }' "$modroot/modules.dep"); do
    dep=${dep##*/}; dep=${dep%%.ko*}; add_module "${dep//-/_}"
  done
  for seen in "${order[@]:-}"; do [ "$seen" = "$path" ] && return; done
  order+=("$path")
}
for m in $wanted; do add_module "$m"; done
: > "$initrd/lib/modules/load-order"
for path in "${order[@]:-}"; do
  [ -n "$path" ] || continue
  base=${path##*/}
  case "$base" in
    *.ko.xz) xz -dc "$modroot/$path" > "$initrd/lib/modules/${base%.xz}" ;;
    *.ko.zst) zstd -qdc "$modroot/$path" > "$initrd/lib/modules/${base%.zst}" ;;
    *.ko.gz) gzip -dc "$modroot/$path" > "$initrd/lib/modules/${base%.gz}" ;;
    *) cp "$modroot/$path" "$initrd/lib/modules/$base" ;;
  esac
  echo "${base%.ko*}.ko" >> "$initrd/lib/modules/load-order"
done
cp "$root/scripts/guest-init.sh" "$initrd/init"
chmod +x "$initrd/init"
# Uncompressed too: a kernel running in KVM's emulator spends minutes in
# gunzip, and an uncompressed cpio is only ~2 MiB.
(cd "$initrd" && find . | cpio -o -H newc --quiet > "$out/initramfs.cpio")
gzip -9 < "$out/initramfs.cpio" > "$out/initramfs.cpio.gz"

# The disk: 8 MiB, a marker in the first sector the guest checks.
disk="$out/disk.img"
rm -f "$disk"
truncate -s 8M "$disk"
printf 'NKVM-DISK-TEST' | dd of="$disk" conv=notrunc status=none

say "kernel $kver: $out/bzImage ($(stat -c %s "$out/bzImage") bytes), $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
say "initramfs: $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes; gzipped: $out/initramfs.cpio.gz; modules: $(tr '\n' ' ' < "$initrd/lib/modules/load-order"))"
say "disk: $disk"
