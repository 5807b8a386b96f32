#!/usr/bin/env bash
# After mmdebstrap (which needs apt and dpkg until it is done): the package
# manifest, then no package manager at run time, and nothing that varies
# from build to build without meaning anything on a read-only root.
# $1: the root filesystem.
set -euo pipefail
root=$1
chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' | sort >"$root/kakehashi-manifest.txt"
rm -rf "$root"/usr/bin/apt* "$root"/usr/bin/dpkg* "$root"/usr/sbin/dpkg* "$root"/usr/lib/apt \
    "$root"/usr/lib/dpkg "$root"/var/lib/apt "$root"/var/lib/dpkg "$root"/var/cache/apt \
    "$root"/var/cache/debconf "$root"/var/cache/ldconfig "$root"/etc/apt \
    "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/lintian
rm -rf "$root"/var/log/* "$root"/var/tmp/* "$root"/tmp/* "$root"/var/lib/systemd/catalog/database \
    "$root"/etc/.pwd.lock "$root"/etc/*- "$root"/etc/ssl/certs/java
find "$root/usr" -name '*.pyc' -delete
