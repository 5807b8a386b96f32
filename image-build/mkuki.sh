#!/usr/bin/env bash
# A unified kernel image: systemd-stub with the kernel, the initramfs, the
# command line and os-release as PE sections (what ukify does; Debian 12
# has no ukify). Each section is placed after the previous one, aligned.
# Usage: mkuki.sh VMLINUZ INITRD CMDLINE OS_RELEASE OUT
set -euo pipefail
vmlinuz=$1 initrd=$2 cmdline=$3 osrel=$4 out=$5
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%s' "$cmdline" >"$tmp/cmdline"
align() { echo $(( ($1 + 4095) / 4096 * 4096 )); }
# End of the stub's last section.
end=0
while read -r _ _ size vma _; do
    e=$(( 16#$vma + 16#$size ))
    [ "$e" -gt "$end" ] && end=$e
done < <(objdump -h "$stub" | awk '$1 ~ /^[0-9]+$/ {print}')
args=()
offset=$(align "$end")
for section in .osrel:"$osrel" .cmdline:"$tmp/cmdline" .initrd:"$initrd" .linux:"$vmlinuz"; do
    name=${section%%:*} file=${section#*:}
    args+=(--add-section "$name=$file" --change-section-vma "$name=$(printf '0x%x' "$offset")")
    offset=$(align $(( offset + $(stat -Lc %s "$file") )))
done
objcopy "${args[@]}" "$stub" "$out"
# objcopy stamps the PE header with the current time (binutils 2.40 ignores
# SOURCE_DATE_EPOCH here) and a checksum over it: set the stamp to
# SOURCE_DATE_EPOCH and the checksum to 0 (UEFI does not check it, and
# Authenticode leaves it out of the signed hash), so the unsigned UKI is
# the same bytes on every build.
pe=$(od -An -tu4 -j 60 -N 4 "$out" | tr -d ' ')
le32() { printf "$(printf '\\x%02x' $(( $1 & 255 )) $(( $1 >> 8 & 255 )) $(( $1 >> 16 & 255 )) $(( $1 >> 24 & 255 )))"; }
le32 "${SOURCE_DATE_EPOCH:?}" | dd of="$out" bs=1 seek=$(( pe + 8 )) conv=notrunc status=none
le32 0 | dd of="$out" bs=1 seek=$(( pe + 88 )) conv=notrunc status=none
