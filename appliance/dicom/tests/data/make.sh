#!/bin/sh
# Regenerates the signed-report fixtures of tests/signature.rs with DCMTK
# and OpenSSL (run here; commit the outputs). Keys are thrown away: the
# tests only verify. The certificates' validity covers the signing time.
set -eu
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/rsa.key" -out rsa-cert.pem \
  -days 36500 -subj "/CN=Dr Reader/O=Reading Center" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ec.key"
openssl req -x509 -new -key "$tmp/ec.key" -out ec-cert.pem -days 36500 \
  -subj "/CN=Dr EC Reader/O=Reading Center"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tmp/other.key" -out other-cert.pem \
  -days 36500 -subj "/CN=Someone Else" 2>/dev/null
sleep 2   # the signatures must come after the certificates' notBefore
xml2dsr report.xml "$tmp/r.dcm"
dcmsign --sign "$tmp/rsa.key" rsa-cert.pem +m2 "$tmp/r.dcm" rsa-sha256.dcm
dcmsign --sign "$tmp/ec.key" ec-cert.pem +m2 "$tmp/r.dcm" ec-sha256.dcm
dcmsign --sign "$tmp/rsa.key" rsa-cert.pem +m5 "$tmp/r.dcm" rsa-sha512.dcm
dcmsign --sign "$tmp/rsa.key" rsa-cert.pem "$tmp/r.dcm" rsa-ripemd160.dcm
dcmconv +td rsa-sha256.dcm rsa-sha256-deflated.dcm
dcmconv +ti rsa-sha256.dcm rsa-sha256-implicit.dcm
cp "$tmp/r.dcm" unsigned.dcm
# Same length, one letter changed in the finding, after signing.
sed 's/No acute findings/No acute findingz/' rsa-sha256.dcm > rsa-sha256-tampered.dcm
cmp -s rsa-sha256.dcm rsa-sha256-tampered.dcm && { echo "tampering changed nothing" >&2; exit 1; }
