#!/usr/bin/env bash
# Installs the Debian packages that `make demo`, `make test` and `make bench`
# need: the real DICOM peers (DCMTK, Orthanc), curl for Orthanc's REST API,
# the reading center's WireGuard (wireguard-go, wg), iproute2 for the network
# namespaces, ping, iperf3 for the tunnel benchmark; libtss2-dev and pkg-config
# to build the TPM binding, swtpm and tpm2-tools as the TPM and its independent
# reader in tests, openssl as an independent signature verifier, strace to
# check the order of the spool's flushes; python3-venv for pynetdicom (a
# second DICOM implementation, from PyPI: Debian 12 does not package it),
# installed pinned into target/py; python3-aiosmtpd as the hospital's SMTP
# relay that urgent findings are mailed through, python3-hl7 (its MLLP
# server) as the RIS that receives them as HL7 ORU^R01; prometheus scrapes the
# metrics endpoint in a test.
# The appliance image (make image, and the tests that boot it): mmdebstrap
# builds the root from Debian packages; erofs-utils, cryptsetup-bin
# (veritysetup), sbsigntool, efitools, systemd-boot-efi, binutils (objcopy:
# the UKI), dosfstools, mtools, fdisk and e2fsprogs make the disk; qemu,
# OVMF (Secure Boot firmware) and swtpm boot it; nmap scans it from outside.
# rauc and squashfs-tools make the signed update bundle (make update-bundle).
# Idempotent: installs only what is missing, so a second run is instant.
set -euo pipefail

packages=(dcmtk orthanc curl prometheus ca-certificates iproute2 iputils-ping wireguard-go wireguard-tools iperf3
          swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config openssl strace
          python3 python3-venv python3-aiosmtpd python3-hl7
          mmdebstrap arch-test erofs-utils cryptsetup-bin sbsigntool efitools systemd-boot-efi
          binutils dosfstools mtools fdisk e2fsprogs qemu-system-x86 ovmf nmap
          rauc squashfs-tools)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
python_deps() {
    # Debian's python3 (not a pyenv one) so that Debian's python3-* packages
    # are visible in the venv too.
    local venv
    venv="$(dirname "$0")/../target/py"
    if "$venv/bin/python3" -c "import pynetdicom, pydicom" 2>/dev/null; then
        return
    fi
    echo "deps: installing pynetdicom into target/py"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check pynetdicom==3.0.4 pydicom==3.0.2
}
if [ ${#missing[@]} -eq 0 ]; then
    python_deps
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "deps: need root to install: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Orthanc's package would start a system service; the tests start their own.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if command -v systemctl >/dev/null && systemctl is-active --quiet orthanc 2>/dev/null; then
    systemctl stop orthanc || true
fi
python_deps
