#!/usr/bin/env bash
# The EFI system partition as a FAT32 image, filled with mtools (nothing is
# mounted): systemd-boot as the removable-media loader, slot A's UKI as a
# type #2 boot entry (slot B gets one when an update writes it), and the Secure Boot keys systemd-boot enrolls when the
# firmware is in setup mode (a new box, or qemu with empty variables).
# Usage: mkesp.sh OUT SIZE_MIB BOOTX64.EFI UKI_A KEYDIR KEY_PREFIX VERSION
set -euo pipefail
out=$1 mib=$2 loader=$3 uki_a=$4 keys=$5 prefix=$6 version=$7
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Signed EFI signature lists: PK signs itself and KEK, KEK signs db. The
# time stamp is SOURCE_DATE_EPOCH (reproducible), and must only grow.
ts=$(date -u -d "@$SOURCE_DATE_EPOCH" '+%Y-%m-%d %H:%M:%S')
owner=6b616b65-6861-7368-6900-000000000001
for k in PK KEK db; do
    cert-to-efi-sig-list -g "$owner" "$keys/$prefix$k.crt" "$tmp/$k.esl"
done
sign-efi-sig-list -t "$ts" -g "$owner" -k "$keys/${prefix}PK.key" -c "$keys/${prefix}PK.crt" PK "$tmp/PK.esl" "$tmp/PK.auth" >/dev/null
sign-efi-sig-list -t "$ts" -g "$owner" -k "$keys/${prefix}PK.key" -c "$keys/${prefix}PK.crt" KEK "$tmp/KEK.esl" "$tmp/KEK.auth" >/dev/null
sign-efi-sig-list -t "$ts" -g "$owner" -k "$keys/${prefix}KEK.key" -c "$keys/${prefix}KEK.crt" db "$tmp/db.esl" "$tmp/db.auth" >/dev/null

cat >"$tmp/loader.conf" <<CONF
# Kakehashi $version. No menu: a field engineer has no keyboard at hand.
# No default either: systemd-boot starts the first entry in its order,
# entries with tries left first, then the newest IMAGE_VERSION. An
# update's entry (newer, tried once) boots next; one that used up its try
# sorts last, and the other slot boots (docs/updates.md).
timeout 0
editor no
auto-entries no
auto-firmware no
# A box in Secure Boot setup mode enrolls the keys under /loader/keys/auto at its
# first boot and restarts with Secure Boot on.
secure-boot-enroll force
CONF

rm -f "$out"
truncate -s "${mib}M" "$out"
mkfs.vfat -F 32 -n ESP -i 4b414b45 --invariant "$out" >/dev/null
export MTOOLS_SKIP_CHECK=1
find "$tmp" "$loader" "$uki_a" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
mmd -i "$out" ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader ::/loader/keys ::/loader/keys/auto
mcopy -m -i "$out" "$loader" ::/EFI/BOOT/BOOTX64.EFI
mcopy -m -i "$out" "$uki_a" ::/EFI/Linux/kakehashi-a.efi
mcopy -m -i "$out" "$tmp/loader.conf" ::/loader/loader.conf
for k in PK KEK db; do
    mcopy -m -i "$out" "$tmp/$k.auth" "::/loader/keys/auto/$k.auth"
done
