#!/usr/bin/env bash
# The EFI system partition as a FAT32 image, filled with mtools (nothing is
# mounted): systemd-boot as the removable-media loader, a UKI per slot as
# type #2 boot entries (slot A the default), and the Secure Boot keys systemd-boot enrolls when the
# firmware is in setup mode (a new box, or qemu with empty variables).
# Usage: mkesp.sh OUT SIZE_MIB BOOTX64.EFI UKI_A UKI_B KEYDIR KEY_PREFIX VERSION
set -euo pipefail
out=$1 mib=$2 loader=$3 uki_a=$4 uki_b=$5 keys=$6 prefix=$7 version=$8
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
# Kakehashi $version. No menu: a field engineer has no keyboard at hand, and
# an update's boot counting decides which slot boots.
timeout 0
default kakehashi-a.efi
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
find "$tmp" "$loader" "$uki_a" "$uki_b" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
mmd -i "$out" ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader ::/loader/keys ::/loader/keys/auto
mcopy -m -i "$out" "$loader" ::/EFI/BOOT/BOOTX64.EFI
mcopy -m -i "$out" "$uki_a" ::/EFI/Linux/kakehashi-a.efi
mcopy -m -i "$out" "$uki_b" ::/EFI/Linux/kakehashi-b.efi
mcopy -m -i "$out" "$tmp/loader.conf" ::/loader/loader.conf
for k in PK KEK db; do
    mcopy -m -i "$out" "$tmp/$k.auth" "::/loader/keys/auto/$k.auth"
done
