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
