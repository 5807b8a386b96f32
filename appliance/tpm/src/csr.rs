//! Public key export (SubjectPublicKeyInfo, PEM) and a PKCS#10 certificate
//! request signed inside the TPM, for enrollment with the reading center.

use crate::der::*;
use crate::EcPoint;

/// SubjectPublicKeyInfo DER for a P-256 point.
pub fn spki_der(point: &EcPoint) -> Vec<u8> {
    seq(&[
        &seq(&[&oid(OID_EC_PUBLIC_KEY), &oid(OID_P256)]),
        &bit_string(point),
    ])
}

/// PEM armour (64-column base64).
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        for _ in chunk.len()..3 {
            b64.push('=');
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The to-be-signed part of a PKCS#10 request: subject CN=`common_name`,
/// O=`organization`, the identity's public key, no attributes.
pub fn request_info(point: &EcPoint, common_name: &str, organization: &str) -> Vec<u8> {
    let rdn = |o: &[u8], value: &str| tlv(0x31, &seq(&[&oid(o), &tlv(0x0c, value.as_bytes())]));
    let subject = seq(&[&rdn(OID_O, organization), &rdn(OID_CN, common_name)]);
    seq(&[&uint(&[0]), &subject, &spki_der(point), &[0xa0, 0x00]])
}

/// The whole request, given the DER ECDSA signature of SHA-256(`info`).
pub fn request(info: &[u8], signature_der: &[u8]) -> Vec<u8> {
    seq(&[
        info,
        &seq(&[&oid(OID_ECDSA_SHA256)]),
        &bit_string(signature_der),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_wraps_base64() {
        assert_eq!(
            pem("X", b"hello"),
            "-----BEGIN X-----\naGVsbG8=\n-----END X-----\n"
        );
        assert_eq!(
            pem("X", b"hi!"),
            "-----BEGIN X-----\naGkh\n-----END X-----\n"
        );
    }
}
