#!/usr/bin/env bash
# make image-reproducible: builds the image twice from this tree, in two
# separate work and output directories, and compares what came out. Prints
# each artifact as SAME or DIFFERENT; exits 1 if the root hash differs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
base=${1:-$(mktemp -d /var/tmp/kakehashi-repro.XXXXXX)}
for n in 1 2; do
    echo "== build $n of 2 (in $base/$n)"
    KAKEHASHI_IMAGE_OUT=$base/$n/out KAKEHASHI_IMAGE_WORK=$base/$n/work \
        "$here/build.sh" >"$base/$n.log" 2>&1 || { tail -20 "$base/$n.log"; exit 2; }
done
same_unsigned() {
    local t
    t=$(mktemp -d)
    cp "$1" "$t/1.efi" && cp "$2" "$t/2.efi"
    sbattach --remove "$t/1.efi" >/dev/null 2>&1 && sbattach --remove "$t/2.efi" >/dev/null 2>&1 \
        && cmp -s "$t/1.efi" "$t/2.efi"
    local r=$?
    rm -rf "$t"
    return $r
}
status=0
for f in roothash root.erofs root.verity kakehashi-a.efi kakehashi-b.efi manifest.txt disk.img; do
    if cmp -s "$base/1/out/$f" "$base/2/out/$f"; then
        printf '  SAME       %s\n' "$f"
    elif [[ $f == *.efi ]] && same_unsigned "$base/1/out/$f" "$base/2/out/$f"; then
        # sbsign puts the signing time into the signature; it has no option
        # to leave it out. Everything the signature covers is the same.
        printf '  SAME       %s (but for the signing time in its signature)\n' "$f"
    else
        printf '  DIFFERENT  %s\n' "$f"
        [ "$f" = roothash ] && status=1
    fi
done
echo "root hash: $(cat "$base/1/out/roothash") / $(cat "$base/2/out/roothash")"
rm -rf "$base/1/work" "$base/2/work"
exit $status
