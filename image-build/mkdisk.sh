#!/usr/bin/env bash
# The GPT disk: fixed GUIDs (reproducible), partitions found by label.
#   1 esp            EFI system partition
#   2 root-a         erofs root of slot A        3 root-a-verity  its hash tree
#   4 root-b         slot B (the same build;     5 root-b-verity
#                    an update rewrites it)
#   6 data           ext4, mounted on /var: spool, keys, config
# Usage: mkdisk.sh OUT ESP ROOT VERITY DATA ESP_MIB ROOT_MIB VERITY_MIB DATA_MIB
set -euo pipefail
out=$1 esp=$2 root=$3 verity=$4 data=$5 esp_mib=$6 root_mib=$7 verity_mib=$8 data_mib=$9
ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
ROOT_TYPE=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709   # root, x86-64
VERITY_TYPE=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5 # root verity, x86-64
VAR_TYPE=4D21B016-B534-45C2-A9FB-5C16E091FD2D
uuid() { printf '6b616b65-6861-7368-6900-%012d' "$1"; }
total=$((1 + esp_mib + 2 * (root_mib + verity_mib) + data_mib + 1))
rm -f "$out"
truncate -s "${total}M" "$out"
start=1
layout="label: gpt
label-id: $(uuid 0)
first-lba: 2048
"
add() { # name type size_mib n
    layout+="start=$((start * 2048)), size=$(($3 * 2048)), type=$2, uuid=$(uuid "$4"), name=$1
"
    start=$((start + $3))
}
add esp "$ESP_TYPE" "$esp_mib" 1
add root-a "$ROOT_TYPE" "$root_mib" 2
add root-a-verity "$VERITY_TYPE" "$verity_mib" 3
add root-b "$ROOT_TYPE" "$root_mib" 4
add root-b-verity "$VERITY_TYPE" "$verity_mib" 5
add data "$VAR_TYPE" "$data_mib" 6
echo "$layout" | sfdisk --quiet --no-reread --no-tell-kernel "$out"
put() { dd if="$1" of="$out" bs=1M seek="$2" conv=notrunc,sparse status=none; }
put "$esp" 1
put "$root" $((1 + esp_mib))
put "$verity" $((1 + esp_mib + root_mib))
put "$root" $((1 + esp_mib + root_mib + verity_mib))
put "$verity" $((1 + esp_mib + 2 * root_mib + verity_mib))
put "$data" $((1 + esp_mib + 2 * (root_mib + verity_mib)))
