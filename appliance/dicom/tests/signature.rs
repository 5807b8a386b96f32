//! Verification of reports signed by DCMTK's `dcmsign` (fixtures made by
//! `tests/data/make.sh`): what verifies, what is held and why.

use std::path::PathBuf;

use kakehashi_dicom::signature::{verify, TrustedSigners};

fn data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// (transfer syntax, dataset) of a Part 10 file.
fn split(file: &[u8]) -> (String, Vec<u8>) {
    assert_eq!(&file[128..132], b"DICM");
    let group_len = u32::from_le_bytes(file[140..144].try_into().expect("4 bytes")) as usize;
    let meta = &file[144..144 + group_len];
    let mut pos = 0;
    let mut ts = String::new();
    while pos < meta.len() {
        let elem = u16::from_le_bytes([meta[pos + 2], meta[pos + 3]]);
        let vr = &meta[pos + 4..pos + 6];
        let (len, hdr) = if vr == b"OB" {
            (
                u32::from_le_bytes(meta[pos + 8..pos + 12].try_into().expect("4")) as usize,
                12,
            )
        } else {
            (
                u16::from_le_bytes([meta[pos + 6], meta[pos + 7]]) as usize,
                8,
            )
        };
        if elem == 0x0010 {
            ts = String::from_utf8_lossy(&meta[pos + hdr..pos + hdr + len])
                .trim_end_matches('\0')
                .to_string();
        }
        pos += hdr + len;
    }
    (ts, file[144 + group_len..].to_vec())
}

fn check(
    name: &str,
    trusted: &TrustedSigners,
) -> Result<Vec<kakehashi_dicom::signature::Signed>, String> {
    let (ts, ds) = split(&data(name));
    verify(&ts, &ds, trusted).map_err(|e| e.0)
}

fn trust(names: &[&str]) -> TrustedSigners {
    let ders: Vec<Vec<u8>> = names
        .iter()
        .flat_map(|n| TrustedSigners::parse(&data(n)).expect("certificate"))
        .collect();
    TrustedSigners::new(&ders)
}

#[test]
fn signatures_made_by_dcmsign_verify() {
    let none = TrustedSigners::default();
    for (file, alg) in [
        ("rsa-sha256.dcm", "RSA SHA256 (key 2048 bits)"),
        ("rsa-sha512.dcm", "RSA SHA512 (key 2048 bits)"),
        ("ec-sha256.dcm", "ECDSA P-256 SHA256 (key 256 bits)"),
        ("rsa-sha256-deflated.dcm", "RSA SHA256 (key 2048 bits)"),
    ] {
        let signed = check(file, &none).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(signed.len(), 1, "{file}");
        assert_eq!(signed[0].algorithm, alg, "{file}");
        assert!(
            signed[0].signer.contains("Reader"),
            "{file}: {}",
            signed[0].signer
        );
    }
    assert_eq!(check("unsigned.dcm", &none), Ok(Vec::new()));
}

#[test]
fn a_changed_letter_fails_the_signature() {
    let why = check("rsa-sha256-tampered.dcm", &TrustedSigners::default()).expect_err("tampered");
    assert!(why.contains("does not verify"), "{why}");
    assert!(why.contains("CN=Dr Reader"), "{why}");
}

#[test]
fn what_cannot_be_checked_is_refused_with_the_reason() {
    let none = TrustedSigners::default();
    let why = check("rsa-ripemd160.dcm", &none).expect_err("ripemd");
    assert!(why.contains("RIPEMD160 is not accepted"), "{why}");
    let why = check("rsa-sha256-implicit.dcm", &none).expect_err("implicit");
    assert!(why.contains("Explicit VR Little Endian"), "{why}");
}

#[test]
fn trusted_signers_pin_who_may_sign() {
    assert!(check("rsa-sha256.dcm", &trust(&["rsa-cert.pem", "ec-cert.pem"])).is_ok());
    let why = check("rsa-sha256.dcm", &trust(&["other-cert.pem"])).expect_err("untrusted");
    assert!(why.contains("not one of results.trusted_signers"), "{why}");
    assert!(TrustedSigners::parse(b"not a certificate").is_err());
}
