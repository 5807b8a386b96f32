#!/usr/bin/env bash
# make recovery-medium: a USB stick image that rewrites slot A of a box's
# disk from a release, for a box neither of whose slots boots
# (docs/updates.md, "Recovery medium").
#
# The stick is a GPT disk with one EFI system partition (partition name
# kakehashi-recovery, FAT label KKH-RECOVER, so the box's provisioning and
# update unit, which reads sticks labelled KAKEHASHI, leaves it alone):
#   EFI/BOOT/BOOTX64.EFI   the recovery UKI: the release's own kernel and
#                          initramfs, signed with the db key (Secure Boot),
#                          its command line kakehashi.recovery=<version>
#                          kakehashi.roothash=<the release's root hash>
#   kakehashi/root.erofs, kakehashi/root.verity, kakehashi/kakehashi-a.efi
#                          the release's slot files
#   kakehashi/version, README.txt
# The initramfs (scripts/local-top/kakehashi-recovery) checks the files
# against the root hash, writes them into slot A, checks the disk, puts
# slot A's entry on the ESP, and never opens the data partition.
#
# Usage: recovery.sh [RELEASE_DIR [OUT]]
#   RELEASE_DIR  a release's files: root.erofs, root.verity, kakehashi-a.efi,
#                version (default image-build/out, what make image wrote;
#                image-build/variant.sh writes the same)
#   OUT          default RELEASE_DIR/kakehashi-recovery-<version>.img
# Signed with KAKEHASHI_KEYS (default image-build/keys: TEST-ONLY keys).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
rel=${1:-${KAKEHASHI_IMAGE_OUT:-$here/out}}
keys=${KAKEHASHI_KEYS:-$here/keys}
die() { echo "recovery.sh: $*" >&2; exit 1; }

for f in root.erofs root.verity kakehashi-a.efi version; do
    [ -f "$rel/$f" ] || die "$rel/$f is missing: build a release first (make image)"
done
version=$(cat "$rel/version")
out=${2:-$rel/kakehashi-recovery-$version.img}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$rel/root.erofs")}
export SOURCE_DATE_EPOCH
prefix=
if [ -f "$keys/TEST-ONLY-db.key" ]; then
    prefix=TEST-ONLY-
    echo "recovery.sh: signing with the TEST-ONLY keys in $keys: this medium proves nothing; set KAKEHASHI_KEYS for a real one" >&2
fi
for k in db.key db.crt; do
    [ -f "$keys/$prefix$k" ] || die "signing key $keys/$prefix$k is missing (see image-build/keys/README.md)"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The release's own kernel, initramfs and root hash, from its slot A UKI.
for s in linux initrd cmdline osrel; do
    objcopy -O binary --only-section=".$s" "$rel/kakehashi-a.efi" "$tmp/$s"
    [ -s "$tmp/$s" ] || die "$rel/kakehashi-a.efi has no .$s section: not a Kakehashi UKI"
done
roothash=$(tr ' ' '\n' <"$tmp/cmdline" | sed -n 's/^kakehashi\.roothash=//p')
[ "${#roothash}" -eq 64 ] || die "$rel/kakehashi-a.efi's command line carries no root hash"
# The box checks this again before it writes anything; a medium that
# cannot pass is not made.
veritysetup verify "$rel/root.erofs" "$rel/root.verity" "$roothash" ||
    die "$rel/root.erofs and root.verity do not match the root hash of kakehashi-a.efi"

line="root=/dev/mapper/root rootfstype=erofs ro kakehashi.recovery=$version kakehashi.roothash=$roothash console=tty0 console=ttyS0,115200 panic=10"
"$here/mkuki.sh" "$tmp/linux" "$tmp/initrd" "$line" "$tmp/osrel" "$tmp/recovery.efi"
sbsign --key "$keys/${prefix}db.key" --cert "$keys/${prefix}db.crt" \
    --output "$tmp/BOOTX64.EFI" "$tmp/recovery.efi" 2>/dev/null

cat >"$tmp/README.txt" <<EOF
Kakehashi recovery medium, release $version

Boot a box from this stick (the firmware's boot menu, or USB first in its
boot order; Secure Boot stays on). It checks the files here against the
release's root hash, writes them into slot A of the box's disk, checks the
disk, and makes slot A bootable. The data partition (queue, keys, config)
is never opened. When the console says KAKEHASHI RECOVERY DONE, pull the
stick out: the box restarts from slot A.

See docs/updates.md, "Recovery medium".
EOF

files=("$rel/root.erofs" "$rel/root.verity" "$rel/kakehashi-a.efi" "$tmp/BOOTX64.EFI")
bytes=0
for f in "${files[@]}"; do bytes=$((bytes + $(stat -Lc %s "$f"))); done
# FAT32 needs 33 MiB at least; room for its tables and the small files.
fat_mib=$(( (bytes >> 20) + 40 ))
fat=$tmp/fat.img
truncate -s "${fat_mib}M" "$fat"
mkfs.vfat -F 32 -n KKH-RECOVER -i 4b4b4852 --invariant "$fat" >/dev/null
export MTOOLS_SKIP_CHECK=1
cp "$rel/version" "$tmp/version"
find "$tmp" -maxdepth 1 -type f -exec touch --date="@$SOURCE_DATE_EPOCH" {} +
mmd -i "$fat" ::/EFI ::/EFI/BOOT ::/kakehashi
mcopy -i "$fat" "$tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$fat" "$tmp/README.txt" ::/README.txt
mcopy -i "$fat" "$tmp/version" ::/kakehashi/version
for f in root.erofs root.verity kakehashi-a.efi; do
    mcopy -i "$fat" "$rel/$f" "::/kakehashi/$f"
done

rm -f "$out"
truncate -s "$((fat_mib + 2))M" "$out"
printf 'label: gpt\nlabel-id: 6b616b65-6861-7368-6900-7265636f7672\nstart=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=6b616b65-6861-7368-6900-7265636f7631, name=kakehashi-recovery\n' \
    $((fat_mib * 2048)) | sfdisk --quiet --no-reread --no-tell-kernel "$out"
dd if="$fat" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
echo "recovery.sh: $out (release $version, root hash $roothash, $((fat_mib + 2)) MiB)"
echo "  write it to a stick: dd if=$(basename "$out") of=/dev/sdX bs=4M conv=fsync"
