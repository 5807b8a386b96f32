//! Query/retrieve identifiers (PS3.4 C.4): the small datasets a C-FIND
//! sends and gets back, and a C-MOVE sends.
//!
//! Always implicit VR little endian (the box proposes only that for its
//! query/retrieve contexts). Values are text (the keys the box asks for are
//! all strings: UIDs, IDs, dates, code strings); a sequence in an answer is
//! skipped. Decoding never panics and bounds its work on hostile input.

use std::collections::BTreeMap;

/// Study Root Query/Retrieve Information Model – FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Study Root Query/Retrieve Information Model – MOVE.
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
/// Study Root Query/Retrieve Information Model - GET.
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

pub mod tag {
    pub const QUERY_RETRIEVE_LEVEL: u32 = 0x0008_0052;
    pub const STUDY_DATE: u32 = 0x0008_0020;
    pub const STUDY_TIME: u32 = 0x0008_0030;
    pub const ACCESSION_NUMBER: u32 = 0x0008_0050;
    pub const MODALITY: u32 = 0x0008_0060;
    pub const MODALITIES_IN_STUDY: u32 = 0x0008_0061;
    pub const STUDY_DESCRIPTION: u32 = 0x0008_1030;
    pub const PATIENT_ID: u32 = 0x0010_0020;
    pub const ISSUER_OF_PATIENT_ID: u32 = 0x0010_0021;
    pub const BODY_PART_EXAMINED: u32 = 0x0018_0015;
    pub const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
    pub const SERIES_INSTANCE_UID: u32 = 0x0020_000E;
    pub const SOP_INSTANCE_UID: u32 = 0x0008_0018;
    pub const SOP_CLASS_UID: u32 = 0x0008_0016;
    pub const NUMBER_OF_STUDY_RELATED_INSTANCES: u32 = 0x0020_1208;
}

const UI_TAGS: [u32; 4] = [
    tag::STUDY_INSTANCE_UID,
    tag::SERIES_INSTANCE_UID,
    tag::SOP_INSTANCE_UID,
    tag::SOP_CLASS_UID,
];

/// A flat identifier: tag → text value (empty: "return this key").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifier {
    values: BTreeMap<u32, String>,
}

impl Identifier {
    pub fn new() -> Identifier {
        Identifier::default()
    }

    /// Sets `tag` (an empty value asks the peer to return it).
    pub fn with(mut self, tag: u32, value: &str) -> Identifier {
        self.values.insert(tag, value.to_string());
        self
    }

    /// The value of `tag`, trimmed; `None` if absent or empty.
    pub fn get(&self, tag: u32) -> Option<&str> {
        self.values
            .get(&tag)
            .map(|v| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// A multi-valued attribute split on `\`.
    pub fn values(&self, tag: u32) -> Vec<String> {
        self.get(tag)
            .map(|v| {
                v.split('\\')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Implicit VR little endian, in tag order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, value) in &self.values {
            let mut v = value.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(if UI_TAGS.contains(tag) { 0 } else { b' ' });
            }
            out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
            out.extend_from_slice(&(*tag as u16).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(&v);
        }
        out
    }

    /// Reads the top-level elements of an implicit VR LE dataset as text;
    /// sequences (defined or undefined length) are skipped. `None` when the
    /// bytes are not a dataset.
    pub fn decode(bytes: &[u8]) -> Option<Identifier> {
        let mut values = BTreeMap::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let (tag, len) = header(bytes, pos)?;
            pos += 8;
            match len {
                Some(len) => {
                    let end = pos.checked_add(len as usize)?;
                    let value = bytes.get(pos..end)?;
                    // A sequence of defined length starts with an item tag.
                    let is_sequence = value.len() >= 4 && value[..4] == [0xFE, 0xFF, 0x00, 0xE0];
                    if !is_sequence && (tag >> 16) != 0xFFFE {
                        let text = String::from_utf8_lossy(value)
                            .trim_end_matches(['\0', ' '])
                            .trim_start()
                            .to_string();
                        values.insert(tag, text);
                    }
                    pos = end;
                }
                None => pos = skip_undefined(bytes, pos, 0)?,
            }
        }
        Some(Identifier { values })
    }
}

/// `raw` (an implicit VR LE identifier) with an empty `tag` inserted in tag
/// order at the top level if it has none, so the peer returns it; every
/// other byte unchanged. `None` when `raw` is not a dataset.
pub fn with_return_key(raw: &[u8], tag: u32) -> Option<Vec<u8>> {
    let mut pos = 0;
    while pos < raw.len() {
        let (t, len) = header(raw, pos)?;
        if t == tag {
            return Some(raw.to_vec());
        }
        if t > tag {
            break;
        }
        pos = match len {
            Some(len) => (pos + 8).checked_add(len as usize)?,
            None => skip_undefined(raw, pos + 8, 0)?,
        };
        if pos > raw.len() {
            return None;
        }
    }
    let mut out = Vec::with_capacity(raw.len() + 8);
    out.extend_from_slice(&raw[..pos]);
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&raw[pos..]);
    Some(out)
}

const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQUENCE_END: u32 = 0xFFFE_E0DD;

fn header(bytes: &[u8], pos: usize) -> Option<(u32, Option<u32>)> {
    let h = bytes.get(pos..pos + 8)?;
    let tag = (u32::from(u16::from_le_bytes([h[0], h[1]])) << 16)
        | u32::from(u16::from_le_bytes([h[2], h[3]]));
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    Some((tag, (len != u32::MAX).then_some(len)))
}

/// Skips an undefined-length sequence or item body starting at `pos`;
/// the position after its delimiter.
fn skip_undefined(bytes: &[u8], mut pos: usize, depth: u8) -> Option<usize> {
    if depth > 16 {
        return None;
    }
    loop {
        let (tag, len) = header(bytes, pos)?;
        pos += 8;
        if tag == SEQUENCE_END || tag == ITEM_END {
            return Some(pos);
        }
        pos = match len {
            Some(len) => pos.checked_add(len as usize)?,
            None if tag == ITEM => skip_undefined(bytes, pos, depth + 1)?,
            None => skip_undefined(bytes, pos, depth + 1)?,
        };
    }
}

/// Sub-operation counts of a C-MOVE response (PS3.7 C.4.2.1.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubOperations {
    pub remaining: u16,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let id = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
            .with(tag::PATIENT_ID, "PID-1")
            .with(tag::STUDY_INSTANCE_UID, "1.2.3")
            .with(tag::MODALITIES_IN_STUDY, "");
        let bytes = id.encode();
        assert_eq!(bytes.len() % 2, 0);
        // tag order: (0008,0052) first
        assert_eq!(&bytes[..4], &[0x08, 0x00, 0x52, 0x00]);
        let back = Identifier::decode(&bytes).expect("decodes");
        assert_eq!(back.get(tag::PATIENT_ID), Some("PID-1"));
        assert_eq!(back.get(tag::STUDY_INSTANCE_UID), Some("1.2.3"));
        assert_eq!(back.get(tag::MODALITIES_IN_STUDY), None);
        // UI padded with NUL, text with space
        assert!(bytes.windows(6).any(|w| w == b"1.2.3\0"));
        assert!(bytes.windows(6).any(|w| w == b"PID-1 "));
    }

    #[test]
    fn multi_values_and_sequences_are_handled() {
        let mut bytes = Identifier::new()
            .with(tag::MODALITIES_IN_STUDY, "CT\\SR")
            .encode();
        // an undefined-length sequence with one item holding a decoy
        bytes.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        bytes.extend(Identifier::new().with(tag::PATIENT_ID, "DECOY").encode());
        bytes.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        bytes.extend(
            Identifier::new()
                .with(tag::STUDY_INSTANCE_UID, "9.9")
                .encode(),
        );
        let id = Identifier::decode(&bytes).expect("decodes");
        assert_eq!(id.values(tag::MODALITIES_IN_STUDY), vec!["CT", "SR"]);
        assert_eq!(
            id.get(tag::PATIENT_ID),
            None,
            "the nested value is not taken"
        );
        assert_eq!(id.get(tag::STUDY_INSTANCE_UID), Some("9.9"));
        for cut in 0..bytes.len() {
            let _ = Identifier::decode(&bytes[..cut]);
            let _ = with_return_key(&bytes[..cut], tag::PATIENT_ID);
        }
    }

    #[test]
    fn a_return_key_is_inserted_in_order_and_nothing_else_changes() {
        let raw = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
            .with(tag::STUDY_INSTANCE_UID, "1.2.3")
            .encode();
        let with = with_return_key(&raw, tag::PATIENT_ID).expect("a dataset");
        let want = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
            .with(tag::PATIENT_ID, "")
            .with(tag::STUDY_INSTANCE_UID, "1.2.3")
            .encode();
        assert_eq!(with, want);
        // Present already (even empty): unchanged.
        assert_eq!(with_return_key(&want, tag::PATIENT_ID), Some(want.clone()));
        // At the end.
        let last = with_return_key(&raw, 0x0040_0000).expect("a dataset");
        assert_eq!(&last[..raw.len()], &raw[..]);
        assert_eq!(with_return_key(&raw[..5], tag::PATIENT_ID), None);
    }
}
