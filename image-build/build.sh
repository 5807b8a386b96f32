#!/usr/bin/env bash
# make image: the Kakehashi appliance image, from Debian 12 packages only.
#
# Output in image-build/out/:
#   disk.img           GPT disk: ESP, root A + verity A, root B + verity B, data
#                      (slot A boots; B holds the same root but has no boot
#                      entry until an update writes it)
#   kakehashi-a.efi, kakehashi-b.efi
#                      the signed UKIs of slot A and B (kernel, initramfs, command
#                      line with the slot and the root hash)
#   root.erofs, root.verity, roothash   the root filesystem, its hash tree and root hash
#   manifest.txt       every package and version in the image
#   version            the image's version
#   SHA256SUMS
#
# Inputs: the release binaries in target/release (make image builds them),
# the Debian bookworm suite from the configured mirror, image-build/rootfs/
# (files laid over the root), systemd/ (units), the signing keys
# (KAKEHASHI_KEYS, default image-build/keys: TEST-ONLY keys).
# SOURCE_DATE_EPOCH (default: the last commit's time) fixes every time stamp.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
out=${KAKEHASHI_IMAGE_OUT:-$here/out}
work=${KAKEHASHI_IMAGE_WORK:-$here/work}
keys=${KAKEHASHI_KEYS:-$here/keys}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct)}
export SOURCE_DATE_EPOCH
version=${KAKEHASHI_VERSION:-$(grep -m1 '^version' "$top/Cargo.toml" | cut -d'"' -f2)+$(git -C "$top" rev-parse --short=10 HEAD)}
suite=bookworm
mirror=${KAKEHASHI_MIRROR:-http://deb.debian.org/debian}

# Sizes (MiB). Slots are sized for growth: an update writes slot B.
esp_mib=128
root_mib=512
verity_mib=16
data_mib=${KAKEHASHI_DATA_MIB:-1024}

say() { printf '\033[1m== %s\033[0m\n' "$*"; }
die() { echo "build.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap builds the root filesystem as root; make image does)"
for b in kakehashid kakehashi; do
    [ -x "$top/target/release/$b" ] || die "target/release/$b is missing: cargo build --release (make image does)"
done
if [ -f "$keys/TEST-ONLY-db.key" ]; then
    prefix=TEST-ONLY-
    echo "build.sh: signing with the TEST-ONLY keys in $keys: this image proves nothing; set KAKEHASHI_KEYS for a real build" >&2
else
    prefix=
fi
for k in db.key db.crt PK.crt KEK.crt PK.key KEK.key update.crt; do
    [ -f "$keys/$prefix$k" ] || die "signing key $keys/$prefix$k is missing (see image-build/keys/README.md)"
done

# A build killed while mmdebstrap ran leaves /proc, /sys and /dev/pts of the
# chroot mounted: unmount them (deepest first) before removing the tree, and
# never let rm cross into another filesystem.
if [ -d "$work" ]; then
    findmnt -rn -o TARGET | { grep -F "$(realpath "$work")/" || true; } | sort -r | while read -r m; do
        umount -l "$m" || die "a stale mount $m is left from an earlier build and cannot be unmounted"
    done
fi
rm -rf --one-file-system "$work" "$out"
mkdir -p "$work" "$out"
rootfs=$work/rootfs

say "root filesystem (mmdebstrap $suite, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
packages=(
    # boot and system
    systemd systemd-sysv udev linux-image-amd64 initramfs-tools zstd kmod
    cryptsetup-bin dmsetup
    # network, time, firewall
    iproute2 nftables systemd-timesyncd systemd-resolved
    # the TPM (libraries the daemon links, and the tss group)
    tpm-udev libtss2-esys-3.0.2-0 libtss2-tctildr0 libtss2-tcti-device0 libtss2-mu0 libtss2-rc0 libtss2-sys1
    # the provisioning medium
    dosfstools
    # updates: RAUC (with dbus) writes the other slot; systemd-boot's
    # package brings systemd-bless-boot, which marks a tried boot good
    rauc systemd-boot
)
mmdebstrap --mode=root --variant=minbase --format=directory \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook="sync-in '$here/rootfs' /" \
    --customize-hook="$here/customize.sh \"\$1\" '$top' '$version' '$keys/${prefix}update.crt'" \
    "$suite" "$rootfs" "$mirror" >"$work/mmdebstrap.log" 2>&1 \
    || { tail -30 "$work/mmdebstrap.log"; die "mmdebstrap failed (log: $work/mmdebstrap.log)"; }
"$here/finalize.sh" "$rootfs"
mv "$rootfs/kakehashi-manifest.txt" "$out/manifest.txt"
kernel=$(basename "$rootfs"/boot/vmlinuz-*)
kver=${kernel#vmlinuz-}
cp "$rootfs/boot/$kernel" "$work/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$work/initrd"
rm -rf "${rootfs:?}"/boot/*
echo "$version" >"$out/version"

say "systemd-analyze security kakehashid.service (inside the image)"
systemd-analyze security --offline=true --root="$rootfs" kakehashid.service | tee "$work/security.txt" | tail -1
exposure=$(grep -o 'exposure level for kakehashid.service: [0-9.]*' "$work/security.txt" | awk '{print $NF}')
awk -v e="$exposure" 'BEGIN { exit !(e <= 1.5) }' || die "kakehashid.service exposure $exposure is above 1.5"
echo "$exposure" >"$out/exposure"

say "erofs root and its dm-verity hash tree"
# Every time stamp is SOURCE_DATE_EPOCH, every file root's unless it says
# otherwise: the same tree gives the same image.
find "$rootfs" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
mkfs.erofs -zlz4hc -T "$SOURCE_DATE_EPOCH" -U 6b616b65-6861-7368-6900-726f6f746673 \
    "$out/root.erofs" "$rootfs" >"$work/mkfs.log"
# Salt and UUID fixed (derived from nothing secret): reproducible hashes.
salt=$(printf 'kakehashi-root' | sha256sum | cut -c1-64)
veritysetup format "$out/root.erofs" "$out/root.verity" --salt="$salt" \
    --uuid=6b616b65-6861-7368-6900-766572697479 >"$work/verity.txt"
roothash=$(awk '/^Root hash:/ {print $3}' "$work/verity.txt")
echo "$roothash" >"$out/roothash"
root_bytes=$(stat -c %s "$out/root.erofs")
[ "$root_bytes" -le $((root_mib << 20)) ] || die "root filesystem ($root_bytes bytes) does not fit its $root_mib MiB slot"

say "UKIs (systemd-stub, kernel $kver, root hash $roothash)"
for slot in a b; do
    # Kept for variant.sh (other releases of this tree, for update tests).
    echo "root=/dev/mapper/root rootfstype=erofs ro kakehashi.slot=$slot rauc.slot=$slot kakehashi.roothash=$roothash console=tty0 console=ttyS0,115200 panic=10" >"$work/cmdline-$slot"
    "$here/mkuki.sh" "$work/vmlinuz" "$work/initrd" "$(cat "$work/cmdline-$slot")" \
        "$rootfs/usr/lib/os-release" "$work/kakehashi-$slot.unsigned.efi"
    sbsign --key "$keys/${prefix}db.key" --cert "$keys/${prefix}db.crt" \
        --output "$out/kakehashi-$slot.efi" "$work/kakehashi-$slot.unsigned.efi" 2>/dev/null
done
sbsign --key "$keys/${prefix}db.key" --cert "$keys/${prefix}db.crt" \
    --output "$work/BOOTX64.EFI" /usr/lib/systemd/boot/efi/systemd-bootx64.efi 2>/dev/null

say "ESP (systemd-boot, slot A's UKI, the Secure Boot keys to enroll)"
"$here/mkesp.sh" "$work/esp.img" "$esp_mib" "$work/BOOTX64.EFI" "$out/kakehashi-a.efi" \
    "$keys" "$prefix" "$version"

say "data partition (ext4, empty: /var)"
truncate -s "${data_mib}M" "$work/data.img"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -L kakehashi-data \
    -U 6b616b65-6861-7368-6900-646174610000 -E hash_seed=6b616b65-6861-7368-6900-686173680000 \
    "$work/data.img"

say "GPT disk"
"$here/mkdisk.sh" "$out/disk.img" "$work/esp.img" "$out/root.erofs" "$out/root.verity" \
    "$work/data.img" "$esp_mib" "$root_mib" "$verity_mib" "$data_mib"

(cd "$out" && sha256sum disk.img kakehashi-a.efi kakehashi-b.efi root.erofs root.verity roothash manifest.txt version >SHA256SUMS)
say "done: $out"
printf '  version   %s\n  root hash %s\n  root      %s MiB (erofs, lz4hc) in a %s MiB slot\n  disk.img  %s MiB (sparse: %s MiB used)\n  packages  %s\n  exposure  %s\n' \
    "$version" "$roothash" "$((root_bytes >> 20))" "$root_mib" \
    "$(($(stat -c %s "$out/disk.img") >> 20))" "$(($(du -k "$out/disk.img" | cut -f1) >> 10))" \
    "$(wc -l <"$out/manifest.txt")" "$exposure"
