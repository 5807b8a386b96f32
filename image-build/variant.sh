#!/usr/bin/env bash
# Another release of the last `make image`, for update tests: the same root
# tree (image-build/work/rootfs) with another version, as root.erofs,
# root.verity, the signed UKIs and a signed bundle, in OUT. No mmdebstrap:
# a minute, not five.
#
# Usage: variant.sh VERSION OUT [KIND]
#   KIND  good          (default) a working release
#         health-fails  kakehashid exits at once: the box boots, fails its
#                       health check, and must go back to the other slot
#         unbootable    a byte of the root filesystem flipped after its hash
#                       tree was made: dm-verity refuses it at boot
# Signed with the same keys as the image (KAKEHASHI_KEYS, default the
# TEST-ONLY ones); the bundle is OUT/kakehashi-VERSION.raucb.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
version=$1 out=$2 kind=${3:-good}
work=${KAKEHASHI_IMAGE_WORK:-$here/work}
image=${KAKEHASHI_IMAGE_OUT:-$here/out}
keys=${KAKEHASHI_KEYS:-$here/keys}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$image/root.erofs")}
export SOURCE_DATE_EPOCH

die() { echo "variant.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (the root tree belongs to root)"
[ -d "$work/rootfs/usr" ] && [ -f "$work/cmdline-a" ] || die "build the image first (make image)"
case $kind in good | health-fails | unbootable) ;; *) die "unknown kind $kind" ;; esac
prefix=
[ -f "$keys/TEST-ONLY-db.key" ] && prefix=TEST-ONLY-

mkdir -p "$out"
tree=$(mktemp -d)
trap 'rm -rf --one-file-system "$tree"' EXIT
cp -a "$work/rootfs/." "$tree/"
sed -i "s/^IMAGE_VERSION=.*/IMAGE_VERSION=$version/" "$tree/usr/lib/os-release"
echo "$version" >"$tree/usr/lib/kakehashi-version"
if [ "$kind" = health-fails ]; then
    cat >"$tree/usr/bin/kakehashid" <<'EOF'
#!/bin/sh
echo "kakehashid: this build is broken on purpose (an update test's health-fails release)" >&2
exit 1
EOF
fi
find "$tree" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
mkfs.erofs -zlz4 -T "$SOURCE_DATE_EPOCH" "$out/root.erofs" "$tree" >/dev/null
salt=$(printf 'kakehashi-root' | sha256sum | cut -c1-64)
roothash=$(veritysetup format "$out/root.erofs" "$out/root.verity" --salt="$salt" | awk '/^Root hash:/ {print $3}')
if [ "$kind" = unbootable ]; then
    # The erofs superblock (at 1 KiB), read at every mount.
    byte=$(od -An -tu1 -j 1040 -N 1 "$out/root.erofs" | tr -d ' ')
    printf "\\x$(printf '%02x' $(( byte ^ 1 )))" | dd of="$out/root.erofs" bs=1 seek=1040 conv=notrunc status=none
fi
cp "$tree/usr/lib/os-release" "$tree/os-release"
for slot in a b; do
    # The image's command line, with this root hash.
    line=$(sed -e "s/kakehashi\.roothash=[0-9a-f]*/kakehashi.roothash=$roothash/" "$work/cmdline-$slot")
    "$here/mkuki.sh" "$work/vmlinuz" "$work/initrd" "$line" "$tree/os-release" "$tree/uki-$slot"
    sbsign --key "$keys/${prefix}db.key" --cert "$keys/${prefix}db.crt" \
        --output "$out/kakehashi-$slot.efi" "$tree/uki-$slot" 2>/dev/null
done
echo "$version" >"$out/version"
KAKEHASHI_IMAGE_OUT=$out "$here/bundle.sh"
