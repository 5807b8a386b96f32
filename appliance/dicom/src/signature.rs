//! Verifies the DICOM digital signatures (PS3.15 Annex C, PS3.3 C.12.1.1.3)
//! of a result before the box delivers it to the hospital's PACS.
//!
//! A signature covers a byte stream, not the file: the listed top-level
//! elements (Data Elements Signed, in dataset order) re-encoded in the MAC
//! Calculation Transfer Syntax in the "signature format" of PS3.5 — a
//! sequence is its tag and VR, then each item's tag and signable elements,
//! then a sequence delimiter, with no lengths — followed by the signature
//! item's own elements except the certificate, the signature and the
//! timestamp. That stream's MAC is signed with the key of the certificate
//! in the item. This is what DCMTK's `dcmsign` makes and checks
//! (`SiMACConstructor`, `writeSignatureFormat`); the test signs with it.
//!
//! What is checked, for every item of the top-level Digital Signatures
//! Sequence: the MAC parameters exist, the MAC algorithm is SHA-1/-256/
//! -384/-512, the signature verifies with the certificate's RSA (PKCS #1
//! v1.5, ≥ 2048 bits) or ECDSA (P-256, P-384) key, the certificate was
//! valid at the signature's date and time, and, when trusted signers are
//! configured, the certificate is one of them or was issued by one of them.
//!
//! Not checked: signatures nested inside sequence items, certified
//! timestamps, revocation, chains longer than one issuer. RIPEMD-160 (the
//! default of `dcmsign`) and MD5 MACs are refused: `ring` has neither, and
//! MD5 is broken. Datasets must be explicit VR little endian (or deflated):
//! an implicit VR dataset does not carry the VRs its signature stream needs.

use std::io::Read;

use base64::Engine as _;
use ring::signature::{self as sig, UnparsedPublicKey, VerificationAlgorithm};
use x509_cert::der::{Decode, Encode};
use x509_cert::Certificate;

use crate::uids::{DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE};

const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQUENCE_END: u32 = 0xFFFE_E0DD;
const DIGITAL_SIGNATURES: u32 = 0xFFFA_FFFA;
const MAC_PARAMETERS: u32 = 0x4FFE_0001;
const MAC_ID: u32 = 0x0400_0005;
const MAC_TRANSFER_SYNTAX: u32 = 0x0400_0010;
const MAC_ALGORITHM: u32 = 0x0400_0015;
const DATA_ELEMENTS_SIGNED: u32 = 0x0400_0020;
const SIGNATURE_UID: u32 = 0x0400_0100;
const SIGNATURE_DATETIME: u32 = 0x0400_0105;
const CERTIFICATE_TYPE: u32 = 0x0400_0110;
const CERTIFICATE: u32 = 0x0400_0115;
const SIGNATURE: u32 = 0x0400_0120;
const CERTIFIED_TIMESTAMP_TYPE: u32 = 0x0400_0305;
const CERTIFIED_TIMESTAMP: u32 = 0x0400_0310;
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// A deflated dataset is inflated to at most this (a deflate bomb stops here).
const MAX_INFLATED: u64 = 256 << 20;
/// Deeper nesting than this is refused (hostile input).
const MAX_DEPTH: u8 = 32;

/// One signature that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The signer's certificate subject (RFC 4514).
    pub signer: String,
    /// E.g. "RSA 2048 SHA256".
    pub algorithm: String,
    /// Digital Signature DateTime, as written.
    pub datetime: String,
}

/// Why a signed result is not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SignatureError(pub String);

fn fail<T>(why: impl Into<String>) -> Result<T, SignatureError> {
    Err(SignatureError(why.into()))
}

/// Certificates a result's signer must be, or be issued by (DER).
#[derive(Debug, Clone, Default)]
pub struct TrustedSigners {
    certs: Vec<Certificate>,
}

impl TrustedSigners {
    /// Reads PEM or DER certificates; the error names what is wrong.
    pub fn parse(pem_or_der: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let text = String::from_utf8_lossy(pem_or_der);
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            Certificate::from_der(pem_or_der)
                .map_err(|e| format!("neither a PEM certificate nor a DER one ({e})"))?;
            return Ok(vec![pem_or_der.to_vec()]);
        }
        let mut out = Vec::new();
        for block in text.split("-----BEGIN CERTIFICATE-----").skip(1) {
            let Some((body, _)) = block.split_once("-----END CERTIFICATE-----") else {
                return Err("a certificate has no END line".into());
            };
            let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .map_err(|e| format!("a certificate is not valid base64 ({e})"))?;
            Certificate::from_der(&der)
                .map_err(|e| format!("a certificate does not parse: {e}"))?;
            out.push(der);
        }
        Ok(out)
    }

    pub fn new(ders: &[Vec<u8>]) -> Self {
        Self {
            certs: ders
                .iter()
                .filter_map(|d| Certificate::from_der(d).ok())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// Verifies every top-level signature of `dataset` (in `transfer_syntax`).
/// `Ok(empty)`: the dataset is not signed. `Err`: a signature is present
/// and fails (the reason names what), or cannot be checked here.
pub fn verify(
    transfer_syntax: &str,
    dataset: &[u8],
    trusted: &TrustedSigners,
) -> Result<Vec<Signed>, SignatureError> {
    let mut inflated = Vec::new();
    let buf = match transfer_syntax {
        DEFLATED_EXPLICIT_VR_LE => {
            flate2::read::DeflateDecoder::new(dataset)
                .take(MAX_INFLATED)
                .read_to_end(&mut inflated)
                .map_err(|e| {
                    SignatureError(format!("the deflated dataset does not inflate: {e}"))
                })?;
            &inflated[..]
        }
        _ => dataset,
    };
    if transfer_syntax == IMPLICIT_VR_LE || transfer_syntax == EXPLICIT_VR_BE {
        // Cheap presence test without VRs: a top-level (FFFA,FFFA) tag.
        return if has_signature_tag(buf) {
            fail(format!("signed, but sent in transfer syntax {transfer_syntax}: its elements carry no VR (or the wrong byte order) to rebuild the signed byte stream; have the reading center send it in Explicit VR Little Endian"))
        } else {
            Ok(Vec::new())
        };
    }
    let top = Parser { buf }
        .elements(0, buf.len(), None, 0)
        .map_err(|e| SignatureError(format!("the dataset does not parse: {e}")))?
        .0;
    let Some(Node::Seq {
        items: signatures, ..
    }) = top.iter().find(|n| n.tag() == DIGITAL_SIGNATURES)
    else {
        return Ok(Vec::new());
    };
    if signatures.is_empty() {
        return fail("an empty Digital Signatures Sequence (FFFA,FFFA)");
    }
    let macs: &[Vec<Node>] = match top.iter().find(|n| n.tag() == MAC_PARAMETERS) {
        Some(Node::Seq { items, .. }) => items,
        _ => return fail("signed, but without a MAC Parameters Sequence (4FFE,0001)"),
    };
    let mut verified = Vec::new();
    for (i, item) in signatures.iter().enumerate() {
        let n = i + 1;
        let one = verify_one(&top, macs, item, trusted)
            .map_err(|e| SignatureError(format!("signature {n}: {}", e.0)))?;
        verified.push(one);
    }
    Ok(verified)
}

fn verify_one(
    top: &[Node],
    macs: &[Vec<Node>],
    item: &[Node],
    trusted: &TrustedSigners,
) -> Result<Signed, SignatureError> {
    let mac_id = leaf(item, MAC_ID)
        .filter(|v| v.len() == 2)
        .map(|v| u16::from_le_bytes([v[0], v[1]]))
        .ok_or(SignatureError("no MAC ID Number (0400,0005)".into()))?;
    let params = macs
        .iter()
        .find(|m| leaf(m, MAC_ID) == Some(&mac_id.to_le_bytes()[..]))
        .ok_or(SignatureError(format!(
            "no MAC parameters with MAC ID {mac_id}"
        )))?;
    let mac_syntax = text(params, MAC_TRANSFER_SYNTAX).unwrap_or_default();
    if mac_syntax != EXPLICIT_VR_LE {
        return fail(format!("MAC Calculation Transfer Syntax {mac_syntax:?} is not supported (only Explicit VR Little Endian)"));
    }
    let mac = text(params, MAC_ALGORITHM).unwrap_or_default();
    let listed: Vec<u32> = leaf(params, DATA_ELEMENTS_SIGNED)
        .map(|v| {
            v.chunks_exact(4)
                .map(|c| {
                    (u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)
                        | u32::from(u16::from_le_bytes([c[2], c[3]]))
                })
                .collect()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        return fail("no Data Elements Signed (0400,0020)");
    }
    match text(item, CERTIFICATE_TYPE).as_deref() {
        Some("X509_1993_SIG") => {}
        other => {
            return fail(format!(
                "certificate type {other:?} is not supported (only X509_1993_SIG)"
            ))
        }
    }
    let cert_der = leaf(item, CERTIFICATE).ok_or(SignatureError(
        "no Certificate of Signer (0400,0115)".into(),
    ))?;
    let signature =
        leaf(item, SIGNATURE).ok_or(SignatureError("no Signature (0400,0120)".into()))?;
    let cert = Certificate::from_der(trim_der(cert_der))
        .map_err(|e| SignatureError(format!("the signer's certificate does not parse: {e}")))?;
    let signer = cert.tbs_certificate.subject.to_string();

    // The signed byte stream.
    let mut stream = Vec::new();
    for node in top.iter().filter(|n| listed.contains(&n.tag())) {
        if !node.signable() {
            return fail(format!(
                "({:04X},{:04X}) is listed as signed but cannot be (unknown VR)",
                node.tag() >> 16,
                node.tag() & 0xFFFF
            ));
        }
        node.encode(&mut stream);
    }
    for node in item.iter().filter(|n| {
        n.signable()
            && ![
                CERTIFICATE,
                SIGNATURE,
                CERTIFIED_TIMESTAMP_TYPE,
                CERTIFIED_TIMESTAMP,
            ]
            .contains(&n.tag())
    }) {
        node.encode(&mut stream);
    }

    let key = public_key(&cert)?;
    let (alg, name): (&'static dyn VerificationAlgorithm, &str) = match (&key.kind, mac.as_str()) {
        (KeyKind::Rsa, "SHA1") => (&sig::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY, "RSA SHA1"),
        (KeyKind::Rsa, "SHA256") => (&sig::RSA_PKCS1_2048_8192_SHA256, "RSA SHA256"),
        (KeyKind::Rsa, "SHA384") => (&sig::RSA_PKCS1_2048_8192_SHA384, "RSA SHA384"),
        (KeyKind::Rsa, "SHA512") => (&sig::RSA_PKCS1_2048_8192_SHA512, "RSA SHA512"),
        (KeyKind::P256, "SHA256") => (&sig::ECDSA_P256_SHA256_ASN1, "ECDSA P-256 SHA256"),
        (KeyKind::P256, "SHA384") => (&sig::ECDSA_P256_SHA384_ASN1, "ECDSA P-256 SHA384"),
        (KeyKind::P384, "SHA256") => (&sig::ECDSA_P384_SHA256_ASN1, "ECDSA P-384 SHA256"),
        (KeyKind::P384, "SHA384") => (&sig::ECDSA_P384_SHA384_ASN1, "ECDSA P-384 SHA384"),
        (_, "RIPEMD160" | "MD5") => {
            return fail(format!("MAC algorithm {mac} is not accepted (SHA256, SHA384, SHA512 or SHA1 are; dcmsign: +m2)"))
        }
        (k, m) => return fail(format!("MAC algorithm {m:?} with a {} key is not supported", k.word())),
    };
    let signature = match key.kind {
        KeyKind::Rsa => signature,
        // dcmsign pads an odd-length DER signature to even length.
        KeyKind::P256 | KeyKind::P384 => trim_der(signature),
    };
    UnparsedPublicKey::new(alg, &key.bytes)
        .verify(&stream, signature)
        .map_err(|_| {
            SignatureError(format!(
                "does not verify ({name}, signer {signer}): the signed elements were altered after signing, or the signature is not this certificate's"
            ))
        })?;

    // The certificate must have been valid when it signed.
    let datetime = text(item, SIGNATURE_DATETIME).unwrap_or_default();
    let at = parse_dt(&datetime).ok_or(SignatureError(format!(
        "Digital Signature DateTime {datetime:?} is not a DICOM date and time"
    )))?;
    let validity = &cert.tbs_certificate.validity;
    let from = validity.not_before.to_unix_duration().as_secs() as i64;
    let until = validity.not_after.to_unix_duration().as_secs() as i64;
    if at < from || at > until {
        return fail(format!(
            "signed at {datetime}, outside its certificate's validity ({} to {})",
            validity.not_before, validity.not_after
        ));
    }
    if !trusted.is_empty() && !is_trusted(&cert, cert_der, trusted) {
        return fail(format!(
            "signer {signer} is not one of results.trusted_signers nor issued by one of them"
        ));
    }
    if text(item, SIGNATURE_UID).is_none() {
        return fail("no Digital Signature UID (0400,0100)");
    }
    Ok(Signed {
        signer,
        algorithm: format!("{name} (key {} bits)", key.bits),
        datetime,
    })
}

fn is_trusted(cert: &Certificate, der: &[u8], trusted: &TrustedSigners) -> bool {
    let der = trim_der(der);
    trusted.certs.iter().any(|t| {
        if t.to_der().is_ok_and(|d| d == der) {
            return true;
        }
        // Issued by a trusted certificate: names match and its signature
        // over the signer's TBS certificate verifies with the issuer's key.
        if t.tbs_certificate.subject != cert.tbs_certificate.issuer {
            return false;
        }
        let (Ok(key), Ok(tbs)) = (public_key(t), cert.tbs_certificate.to_der()) else {
            return false;
        };
        let alg: &'static dyn VerificationAlgorithm =
            match (key.kind, cert.signature_algorithm.oid.to_string().as_str()) {
                (KeyKind::Rsa, "1.2.840.113549.1.1.11") => &sig::RSA_PKCS1_2048_8192_SHA256,
                (KeyKind::Rsa, "1.2.840.113549.1.1.12") => &sig::RSA_PKCS1_2048_8192_SHA384,
                (KeyKind::Rsa, "1.2.840.113549.1.1.13") => &sig::RSA_PKCS1_2048_8192_SHA512,
                (KeyKind::P256, "1.2.840.10045.4.3.2") => &sig::ECDSA_P256_SHA256_ASN1,
                (KeyKind::P256, "1.2.840.10045.4.3.3") => &sig::ECDSA_P256_SHA384_ASN1,
                (KeyKind::P384, "1.2.840.10045.4.3.2") => &sig::ECDSA_P384_SHA256_ASN1,
                (KeyKind::P384, "1.2.840.10045.4.3.3") => &sig::ECDSA_P384_SHA384_ASN1,
                _ => return false,
            };
        cert.signature.as_bytes().is_some_and(|s| {
            UnparsedPublicKey::new(alg, &key.bytes)
                .verify(&tbs, s)
                .is_ok()
        })
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

impl KeyKind {
    fn word(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::P256 => "P-256",
            KeyKind::P384 => "P-384",
        }
    }
}

struct PublicKey {
    kind: KeyKind,
    bytes: Vec<u8>,
    bits: usize,
}

fn public_key(cert: &Certificate) -> Result<PublicKey, SignatureError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let bytes = spki
        .subject_public_key
        .as_bytes()
        .ok_or(SignatureError(
            "the certificate's public key is not whole bytes".into(),
        ))?
        .to_vec();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    let (kind, bits) = match (spki.algorithm.oid.to_string().as_str(), curve.as_deref()) {
        ("1.2.840.113549.1.1.1", _) => (KeyKind::Rsa, rsa_bits(&bytes)),
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => (KeyKind::P256, 256),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => (KeyKind::P384, 384),
        (oid, curve) => {
            return fail(format!(
                "the signer's key type {oid}{} is not supported (RSA, ECDSA P-256 or P-384 are)",
                curve.map(|c| format!(" on curve {c}")).unwrap_or_default()
            ))
        }
    };
    Ok(PublicKey { kind, bytes, bits })
}

/// The modulus size of a PKCS #1 RSAPublicKey (SEQUENCE { INTEGER n,
/// INTEGER e }), for the audit; 0 when it does not parse.
fn rsa_bits(der: &[u8]) -> usize {
    // (header length, content length) of the TLV at `v`.
    fn tlv(v: &[u8]) -> Option<(usize, usize)> {
        match *v.get(1)? {
            l if l < 0x80 => Some((2, usize::from(l))),
            l @ 0x81..=0x84 => {
                let n = usize::from(l - 0x80);
                let len = v
                    .get(2..2 + n)?
                    .iter()
                    .fold(0usize, |a, &x| (a << 8) | usize::from(x));
                Some((2 + n, len))
            }
            _ => None,
        }
    }
    let modulus = (|| {
        let (h, _) = tlv(der).filter(|_| der.first() == Some(&0x30))?;
        let int = der.get(h..)?;
        let (ih, il) = tlv(int).filter(|_| int.first() == Some(&0x02))?;
        let n = int.get(ih..ih + il)?;
        let n = &n[n.iter().take_while(|&&b| b == 0).count()..];
        Some(n.first().map_or(0, |&top| {
            (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
        }))
    })();
    modulus.unwrap_or(0)
}

/// A DER value's own length: drops the pad byte DICOM adds to odd values.
fn trim_der(v: &[u8]) -> &[u8] {
    let len = match v.get(1) {
        Some(&l) if l < 0x80 => Some(2 + usize::from(l)),
        Some(&l) if (0x81..=0x84).contains(&l) => {
            let n = usize::from(l - 0x80);
            v.get(2..2 + n)
                .map(|b| b.iter().fold(0usize, |a, &x| (a << 8) | usize::from(x)) + 2 + n)
        }
        _ => None,
    };
    match len {
        Some(l) if l <= v.len() => &v[..l],
        _ => v,
    }
}

/// DICOM DT (YYYYMMDDHHMMSS[.F][&ZZXX]) to Unix seconds (UTC when no offset).
fn parse_dt(dt: &str) -> Option<i64> {
    let dt = dt.trim();
    let (main, offset) = match dt.find(['+', '-']) {
        Some(i) => (&dt[..i], Some(&dt[i..])),
        None => (dt, None),
    };
    let main = main.split('.').next()?;
    if main.len() < 8 || !main.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let days = crate::days_from_da(main.get(..8)?)?;
    let num = |r: std::ops::Range<usize>| main.get(r).map_or(Some(0), |s| s.parse::<i64>().ok());
    let (h, mi, s) = (num(8..10)?, num(10..12)?, num(12..14)?);
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let off = match offset {
        Some(o) if o.len() == 5 => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let hh: i64 = o[1..3].parse().ok()?;
            let mm: i64 = o[3..5].parse().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
        Some(_) => return None,
        None => 0,
    };
    Some(days * 86_400 + h * 3600 + mi * 60 + s - off)
}

/// Whether a top-level (FFFA,FFFA) tag appears where an element starts,
/// without knowing VRs: walks implicit VR LE headers (tag, 4-byte length).
fn has_signature_tag(buf: &[u8]) -> bool {
    let mut pos = 0usize;
    while let Some(h) = buf.get(pos..pos + 8) {
        let tag = (u32::from(u16::from_le_bytes([h[0], h[1]])) << 16)
            | u32::from(u16::from_le_bytes([h[2], h[3]]));
        if tag == DIGITAL_SIGNATURES {
            return true;
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len == u32::MAX {
            // An undefined-length sequence: its end is not known without
            // walking it; look for the tag anywhere after.
            return buf[pos..].windows(4).any(|w| w == [0xFA, 0xFF, 0xFA, 0xFF]);
        }
        pos = match pos.checked_add(8 + len as usize) {
            Some(p) => p,
            None => return false,
        };
    }
    false
}

/// One element of an explicit VR little endian dataset.
#[derive(Debug)]
enum Node<'a> {
    Leaf {
        tag: u32,
        vr: [u8; 2],
        value: &'a [u8],
    },
    Seq {
        tag: u32,
        items: Vec<Vec<Node<'a>>>,
        /// Whether any element inside has VR UN.
        unknown: bool,
    },
    /// Encapsulated (compressed) pixel data: its fragments.
    Fragments {
        tag: u32,
        vr: [u8; 2],
        fragments: Vec<&'a [u8]>,
    },
}

fn long_vr(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

fn put_tag(out: &mut Vec<u8>, tag: u32) {
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&((tag & 0xFFFF) as u16).to_le_bytes());
}

impl Node<'_> {
    fn tag(&self) -> u32 {
        match self {
            Node::Leaf { tag, .. } | Node::Seq { tag, .. } | Node::Fragments { tag, .. } => *tag,
        }
    }

    /// DCMTK's `isSignable`: no group lengths, no groups below 0008, no
    /// Length to End, no signature or MAC sequences, no trailing padding, no
    /// delimiters, no UN (nor a sequence holding one).
    fn signable(&self) -> bool {
        let tag = self.tag();
        let (group, element) = (tag >> 16, tag & 0xFFFF);
        let by_tag = element != 0
            && tag != 0x0008_0001
            && group >= 8
            && group != 0xFFFA
            && tag != MAC_PARAMETERS
            && tag != 0xFFFC_FFFC
            && tag != ITEM_END
            && tag != SEQUENCE_END;
        by_tag
            && match self {
                Node::Leaf { vr, .. } | Node::Fragments { vr, .. } => vr != b"UN",
                Node::Seq { unknown, .. } => !unknown,
            }
    }

    /// The PS3.15 signature format in explicit VR little endian.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Node::Leaf { tag, vr, value } => {
                put_tag(out, *tag);
                out.extend_from_slice(vr);
                if long_vr(vr) {
                    out.extend_from_slice(&[0, 0]);
                    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                } else {
                    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
                }
                out.extend_from_slice(value);
            }
            Node::Seq { tag, items, .. } => {
                put_tag(out, *tag);
                out.extend_from_slice(b"SQ\0\0");
                for item in items {
                    put_tag(out, ITEM);
                    for n in item.iter().filter(|n| n.signable()) {
                        n.encode(out);
                    }
                }
                put_tag(out, SEQUENCE_END);
            }
            Node::Fragments { tag, vr, fragments } => {
                put_tag(out, *tag);
                out.extend_from_slice(vr);
                out.extend_from_slice(&[0, 0]);
                for f in fragments {
                    put_tag(out, ITEM);
                    out.extend_from_slice(&(f.len() as u32).to_le_bytes());
                    out.extend_from_slice(f);
                }
                put_tag(out, SEQUENCE_END);
            }
        }
    }

    fn unknown(&self) -> bool {
        match self {
            Node::Leaf { vr, .. } | Node::Fragments { vr, .. } => vr == b"UN",
            Node::Seq { unknown, .. } => *unknown,
        }
    }
}

fn leaf<'a>(nodes: &'a [Node], tag: u32) -> Option<&'a [u8]> {
    nodes.iter().find_map(|n| match n {
        Node::Leaf { tag: t, value, .. } if *t == tag => Some(*value),
        _ => None,
    })
}

fn text(nodes: &[Node], tag: u32) -> Option<String> {
    leaf(nodes, tag).map(|v| {
        String::from_utf8_lossy(v)
            .trim_matches(['\0', ' '])
            .to_string()
    })
}

struct Parser<'a> {
    buf: &'a [u8],
}

type Parsed<'a> = (Vec<Node<'a>>, usize);

impl<'a> Parser<'a> {
    fn u16(&self, pos: usize) -> Result<u16, String> {
        self.buf
            .get(pos..pos + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated at byte {pos}"))
    }

    fn u32(&self, pos: usize) -> Result<u32, String> {
        self.buf
            .get(pos..pos + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("truncated at byte {pos}"))
    }

    fn tag(&self, pos: usize) -> Result<u32, String> {
        Ok((u32::from(self.u16(pos)?) << 16) | u32::from(self.u16(pos + 2)?))
    }

    fn slice(&self, from: usize, len: usize) -> Result<&'a [u8], String> {
        from.checked_add(len)
            .and_then(|end| self.buf.get(from..end))
            .ok_or_else(|| format!("a value at byte {from} runs past the end"))
    }

    /// Elements from `pos` up to `end`, or up to the delimiter `until`.
    fn elements(
        &self,
        mut pos: usize,
        end: usize,
        until: Option<u32>,
        depth: u8,
    ) -> Result<Parsed<'a>, String> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        let mut nodes = Vec::new();
        while pos < end {
            let tag = self.tag(pos)?;
            if Some(tag) == until {
                return Ok((nodes, pos + 8));
            }
            if tag >> 16 == 0xFFFE {
                return Err(format!(
                    "unexpected delimiter ({:04X},{:04X}) at byte {pos}",
                    tag >> 16,
                    tag & 0xFFFF
                ));
            }
            let vr_bytes = self.slice(pos + 4, 2)?;
            let vr = [vr_bytes[0], vr_bytes[1]];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(format!("no VR at byte {}: not explicit VR", pos + 4));
            }
            let (len, header) = if long_vr(&vr) {
                (self.u32(pos + 8)?, 12)
            } else {
                (u32::from(self.u16(pos + 6)?), 8)
            };
            let start = pos + header;
            let (node, next) = if vr == *b"SQ" {
                self.sequence(tag, start, len, depth)?
            } else if len == u32::MAX {
                self.fragments(tag, vr, start)?
            } else {
                let value = self.slice(start, len as usize)?;
                (Node::Leaf { tag, vr, value }, start + len as usize)
            };
            nodes.push(node);
            pos = next;
        }
        if until.is_some() {
            return Err("an undefined-length value has no delimiter".into());
        }
        Ok((nodes, pos))
    }

    fn sequence(
        &self,
        tag: u32,
        start: usize,
        len: u32,
        depth: u8,
    ) -> Result<(Node<'a>, usize), String> {
        let end = if len == u32::MAX {
            self.buf.len()
        } else {
            self.slice(start, len as usize)?;
            start + len as usize
        };
        let mut pos = start;
        let mut items = Vec::new();
        loop {
            if len != u32::MAX && pos >= end {
                break;
            }
            let t = self.tag(pos)?;
            let l = self.u32(pos + 4)?;
            if t == SEQUENCE_END && len == u32::MAX {
                pos += 8;
                break;
            }
            if t != ITEM {
                return Err(format!("expected an item at byte {pos}"));
            }
            let (item, next) = if l == u32::MAX {
                self.elements(pos + 8, self.buf.len(), Some(ITEM_END), depth + 1)?
            } else {
                self.slice(pos + 8, l as usize)?;
                let item_end = pos + 8 + l as usize;
                let (nodes, _) = self.elements(pos + 8, item_end, None, depth + 1)?;
                (nodes, item_end)
            };
            items.push(item);
            pos = next;
        }
        let unknown = items.iter().flatten().any(Node::unknown);
        Ok((
            Node::Seq {
                tag,
                items,
                unknown,
            },
            pos,
        ))
    }

    fn fragments(
        &self,
        tag: u32,
        vr: [u8; 2],
        mut pos: usize,
    ) -> Result<(Node<'a>, usize), String> {
        let mut fragments = Vec::new();
        loop {
            let t = self.tag(pos)?;
            let l = self.u32(pos + 4)?;
            pos += 8;
            match t {
                SEQUENCE_END => break,
                ITEM => {
                    fragments.push(self.slice(pos, l as usize)?);
                    pos += l as usize;
                }
                _ => return Err(format!("expected a fragment at byte {}", pos - 8)),
            }
        }
        Ok((Node::Fragments { tag, vr, fragments }, pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dicom_datetimes_become_unix_seconds() {
        assert_eq!(parse_dt("19700101000000"), Some(0));
        assert_eq!(parse_dt("20261123111236.995326+0000"), Some(1_795_432_356));
        assert_eq!(parse_dt("20261123121236+0100"), Some(1_795_432_356));
        assert_eq!(parse_dt("20261123"), Some(1_795_392_000));
        assert_eq!(parse_dt("2026"), None);
        assert_eq!(parse_dt("20261323000000"), None);
    }

    #[test]
    fn der_padding_is_trimmed() {
        assert_eq!(trim_der(&[0x30, 0x03, 1, 2, 3, 0]), &[0x30, 0x03, 1, 2, 3]);
        assert_eq!(trim_der(&[0x30, 0x81, 0x01, 9, 0]), &[0x30, 0x81, 0x01, 9]);
        assert_eq!(trim_der(&[0x30, 0x7F]), &[0x30, 0x7F]);
    }

    fn el(out: &mut Vec<u8>, tag: u32, vr: &[u8; 2], value: &[u8]) {
        Node::Leaf {
            tag,
            vr: *vr,
            value,
        }
        .encode(out);
    }

    #[test]
    fn sequences_take_the_signature_format_whatever_their_encoding() {
        // A defined-length sequence and the same with undefined lengths
        // encode alike: tag, VR, reserved, item tags, a delimiter, no lengths.
        let mut inner = Vec::new();
        el(&mut inner, 0x0008_0100, b"SH", b"121071");
        el(&mut inner, 0x0002_0000, b"UL", &[0; 4]); // not signable: skipped
        let mut defined = Vec::new();
        put_tag(&mut defined, 0x0040_A043);
        defined.extend_from_slice(b"SQ\0\0");
        defined.extend_from_slice(&((inner.len() + 8) as u32).to_le_bytes());
        put_tag(&mut defined, ITEM);
        defined.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        defined.extend_from_slice(&inner);
        let mut undefined = Vec::new();
        put_tag(&mut undefined, 0x0040_A043);
        undefined.extend_from_slice(b"SQ\0\0\xFF\xFF\xFF\xFF");
        put_tag(&mut undefined, ITEM);
        undefined.extend_from_slice(&u32::MAX.to_le_bytes());
        undefined.extend_from_slice(&inner);
        put_tag(&mut undefined, ITEM_END);
        undefined.extend_from_slice(&[0; 4]);
        put_tag(&mut undefined, SEQUENCE_END);
        undefined.extend_from_slice(&[0; 4]);
        let encode = |buf: &[u8]| {
            let (nodes, _) = Parser { buf }
                .elements(0, buf.len(), None, 0)
                .expect("parses");
            let mut out = Vec::new();
            nodes[0].encode(&mut out);
            out
        };
        let mut want = Vec::new();
        put_tag(&mut want, 0x0040_A043);
        want.extend_from_slice(b"SQ\0\0");
        put_tag(&mut want, ITEM);
        el(&mut want, 0x0008_0100, b"SH", b"121071");
        put_tag(&mut want, SEQUENCE_END);
        assert_eq!(encode(&defined), want);
        assert_eq!(encode(&undefined), want);
    }

    #[test]
    fn hostile_datasets_are_errors_not_panics() {
        for bad in [
            &b"\x08\x00\x05\x00CS\xFF\x00"[..],
            b"\x40\x00\x43\xA0SQ\0\0\xFF\xFF\xFF\xFF",
            b"\x40\x00\x43\xA0SQ\0\0\x10\x00\x00\x00\xFE\xFF\x00\xE0\xFF\xFF\xFF\x7F",
            b"\xE0\x7F\x10\x00OB\0\0\xFF\xFF\xFF\xFF\xFE\xFF\x00\xE0\x10\x00\x00\x00",
            b"\x08\x00\x05\x00\x01\x02",
        ] {
            assert!(
                Parser { buf: bad }.elements(0, bad.len(), None, 0).is_err(),
                "{bad:?}"
            );
        }
        // Unsigned and unparsable differ: no signature tag, no error.
        assert_eq!(
            verify(
                IMPLICIT_VR_LE,
                b"\x08\x00\x18\x00\x02\x00\x00\x001\0",
                &TrustedSigners::default()
            ),
            Ok(Vec::new())
        );
    }
}
