//! UIDs the relay needs to recognise, and which SOP classes count as storage.

pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// Whether a SOP class is one the box stores and forwards.
///
/// Standard storage classes live under `1.2.840.10008.5.1.4.1.1.` plus a few
/// stragglers; private (non-`1.2.840.10008`) SOP classes are vendor objects
/// that PACS store and forward too. Everything else standard (query/retrieve,
/// worklist, MPPS, print…) is a service the relay does not provide.
pub fn is_storage_sop_class(uid: &str) -> bool {
    const OTHER_STORAGE: &[&str] = &[
        "1.2.840.10008.5.1.4.38.1",  // Hanging Protocol Storage
        "1.2.840.10008.5.1.4.39.1",  // Color Palette Storage
        "1.2.840.10008.5.1.4.43.1",  // Generic Implant Template Storage
        "1.2.840.10008.5.1.4.44.1",  // Implant Assembly Template Storage
        "1.2.840.10008.5.1.4.45.1",  // Implant Template Group Storage
        "1.2.840.10008.5.1.4.34.7",  // RT Beams Delivery Instruction Storage
        "1.2.840.10008.5.1.4.34.10", // RT Brachy Application Setup Delivery Instruction
        "1.2.840.10008.5.1.1.27",    // Stored Print Storage (retired)
        "1.2.840.10008.5.1.1.29",    // Hardcopy Grayscale Image Storage (retired)
        "1.2.840.10008.5.1.1.30",    // Hardcopy Color Image Storage (retired)
    ];
    uid.starts_with("1.2.840.10008.5.1.4.1.1.")
        || OTHER_STORAGE.contains(&uid)
        || !uid.starts_with("1.2.840.10008.")
}

/// Trims the NUL/space padding DICOM puts on UI values.
pub fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

/// A syntactically valid UID: 1–64 characters of digits and dots.
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
        && !uid.ends_with('.')
        && !uid.contains("..")
}
