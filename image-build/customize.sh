#!/usr/bin/env bash
# mmdebstrap's customize hook: makes the Debian tree an appliance.
# $1: the root filesystem, $2: the source tree, $3: the image version,
# $4: the certificate update bundles must be signed with.
set -euo pipefail
root=$1
top=$2
version=$3
update_cert=$4
ch() { chroot "$root" "$@"; }

# The daemon, the CLI and their units. Debug line tables are dropped: the
# image is for running, symbols stay in target/release.
install -m 0755 -D "$top/target/release/kakehashid" "$root/usr/bin/kakehashid"
install -m 0755 -D "$top/target/release/kakehashi" "$root/usr/bin/kakehashi"
objcopy --strip-debug "$root/usr/bin/kakehashid"
objcopy --strip-debug "$root/usr/bin/kakehashi"
install -m 0644 "$top/systemd/kakehashid.service" "$root/usr/lib/systemd/system/kakehashid.service"
install -m 0644 -D "$top/systemd/kakehashi.sysusers" "$root/usr/lib/sysusers.d/kakehashi.conf"
# /etc/kakehashi is a link into the data partition on the image (below),
# not a directory for tmpfiles to make.
grep -v '^d /etc/kakehashi ' "$top/systemd/kakehashi.tmpfiles" \
    | install -m 0644 -D /dev/stdin "$root/usr/lib/tmpfiles.d/kakehashi.conf"
install -m 0644 -D "$top/docs/image.md" "$root/usr/share/kakehashi/image.md"
install -m 0644 -D "$top/docs/updates.md" "$root/usr/share/kakehashi/updates.md"
# Updates (docs/updates.md): the one certificate RAUC accepts bundles from.
install -m 0644 -D "$update_cert" "$root/usr/share/kakehashi/update-keyring.pem"
mkdir -p "$root/efi"
# systemd-boot's package brings systemd-bless-boot; the image's own signed
# loader on the ESP is never replaced at boot, and kernels go into UKIs,
# never onto the ESP by a package hook.
rm -f "$root/etc/kernel/postinst.d/zz-systemd-boot" "$root/etc/kernel/postrm.d/zz-systemd-boot" \
    "$root/etc/initramfs/post-update.d/systemd-boot"

# Users now: /etc is read-only on the box.
ch systemd-sysusers

# The read-only root's writable places live on the data partition (/var)
# or in /run.
ln -sfn /var/lib/kakehashi/etc "$root/etc/kakehashi"
ln -sfn /usr/share/zoneinfo/UTC "$root/etc/localtime"
# A machine id per boot (empty: systemd makes a transient one); nothing on
# the box keys on it (networkd's DHCP identity is the MAC, see the render).
: >"$root/etc/machine-id"
echo kakehashi >"$root/etc/hostname"
# The kernel and initramfs go into the UKI; the links to them are dangling.
rm -f "$root"/vmlinuz* "$root"/initrd.img*
echo "$version" >"$root/usr/lib/kakehashi-version"
# The image's identity and version in os-release (the UKI's .osrel section
# is this file): systemd-boot orders the slots' entries by IMAGE_VERSION,
# newest first, and `kakehashi appliance slots` reads it from each UKI.
printf 'IMAGE_ID=kakehashi\nIMAGE_VERSION=%s\n' "$version" >>"$root/usr/lib/os-release"

# No password login anywhere: root is locked, no console getty (the console
# shows the box's summary instead), no interactive first-boot questions.
ch usermod --lock --expiredate 1 root
ch systemctl mask getty@.service serial-getty@.service autovt@.service console-getty.service \
    systemd-firstboot.service systemd-networkd-wait-online.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service >/dev/null 2>&1 || true
ch systemctl mask systemd-boot-update.service systemd-boot-system-token.service >/dev/null
ch systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
    kakehashi-render.service kakehashid.service kakehashi-health.service \
    kakehashi-update-settle.service >/dev/null

# Kernel modules a relay box never loads (graphics, sound, radio, exotic
# filesystems...): a smaller image and less to attack.
kdir=$(echo "$root"/usr/lib/modules/*)
for d in drivers/gpu drivers/media sound drivers/net/wireless drivers/infiniband drivers/staging \
    drivers/isdn drivers/bluetooth net/bluetooth drivers/iio drivers/video drivers/hwmon \
    drivers/net/can net/can drivers/comedi drivers/nfc net/nfc drivers/mtd drivers/thunderbolt \
    fs/btrfs fs/xfs fs/ocfs2 fs/gfs2 fs/ceph fs/nfs fs/nfsd fs/smb fs/cifs fs/f2fs fs/reiserfs \
    fs/jfs fs/nilfs2 fs/ubifs fs/afs fs/coda fs/ntfs3 fs/orangefs fs/dlm net/wireless net/mac80211 \
    drivers/net/wan drivers/net/hamradio drivers/atm net/atm drivers/parport drivers/firewire \
    drivers/mfd drivers/power drivers/platform/chrome drivers/leds drivers/misc/habanalabs; do
    rm -rf "${kdir:?}/kernel/$d"
done
ch depmod "$(basename "$kdir")"
rm -rf "$root"/usr/lib/firmware/* 2>/dev/null || true
# The initramfs again, with the verity hook (hooks/kakehashi).
ch update-initramfs -u -k all >/dev/null

