#!/usr/bin/env bash
# make update-bundle: a signed RAUC bundle of the image in image-build/out,
# for a box to install into its inactive slot (see docs/updates.md).
#
# Output: image-build/out/kakehashi-<version>.raucb, a RAUC 1.8 bundle in
# the verity format (the payload is a squashfs checked block by block by
# dm-verity against a root hash in the signed manifest) holding:
#   root.img         the root filesystem (root.erofs) -> slot class rootfs (root-a/root-b)
#   root-verity.img  its dm-verity hash tree           -> slot class verity
#   kakehashi-a.efi, kakehashi-b.efi
#                  the signed UKIs; the box copies the one of the slot it
#                  wrote to its ESP after writing it
# The manifest's compatible is the one in the image's /etc/rauc/system.conf
# (image-build/rootfs/etc/rauc/system.conf: the box refuses any other), its version the image's.
#
# Signed with KAKEHASHI_KEYS/update.key and update.crt (default: the
# TEST-ONLY pair in image-build/keys, which proves nothing).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${KAKEHASHI_IMAGE_OUT:-$here/out}
keys=${KAKEHASHI_KEYS:-$here/keys}

die() { echo "bundle.sh: $*" >&2; exit 1; }

command -v rauc >/dev/null || die "rauc is missing (apt-get install rauc squashfs-tools; make update-bundle does)"
if [ -f "$keys/TEST-ONLY-update.key" ]; then
    prefix=TEST-ONLY-
    echo "bundle.sh: signing with the TEST-ONLY update key in $keys: this bundle proves nothing; set KAKEHASHI_KEYS for a real release" >&2
else
    prefix=
fi
key=$keys/${prefix}update.key
cert=$keys/${prefix}update.crt
for f in "$key" "$cert"; do
    [ -f "$f" ] || die "update signing key $f is missing (see image-build/keys/README.md)"
done
for f in root.erofs root.verity kakehashi-a.efi kakehashi-b.efi version; do
    [ -f "$out/$f" ] || die "$out/$f is missing: build the image first (make image)"
done
conf=$here/rootfs/etc/rauc/system.conf
compatible=$(sed -n 's/^compatible=//p' "$conf")
[ -n "$compatible" ] || die "no compatible= in $conf"
version=$(cat "$out/version")
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || die "the image's version '$version' does not start with MAJOR.MINOR.PATCH (the box orders releases by it)"

stage=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$stage" "$log"' EXIT
# Hard links: the files are large and only read. RAUC 1.8 writes a raw
# slot only from an image named *.img.
link() { ln "$out/$1" "$stage/$2" 2>/dev/null || cp "$out/$1" "$stage/$2"; }
link root.erofs root.img
link root.verity root-verity.img
link kakehashi-a.efi kakehashi-a.efi
link kakehashi-b.efi kakehashi-b.efi
cat >"$stage/manifest.raucm" <<EOF
[update]
compatible=$compatible
version=$version
description=Kakehashi appliance $version

[bundle]
format=verity

[image.rootfs]
filename=root.img

[image.verity]
filename=root-verity.img
EOF

bundle=$out/kakehashi-$version.raucb
rm -f "$bundle"
rauc bundle --cert="$cert" --key="$key" "$stage" "$bundle" >"$log" 2>&1 \
    || { cat "$log" >&2; die "rauc bundle failed"; }
# Check it as a box would: the signature against the certificate the image
# trusts (for the TEST-ONLY key, the certificate itself).
rauc info --keyring="$cert" "$bundle" >/dev/null 2>"$log" \
    || { cat "$log" >&2; die "the new bundle does not verify against $cert"; }
printf '  bundle    %s (%s MiB)\n  version   %s\n  compatible %s\n' \
    "$bundle" "$(( $(stat -c %s "$bundle") >> 20 ))" "$version" "$compatible"
