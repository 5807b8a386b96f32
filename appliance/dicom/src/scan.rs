//! Reads the routing keys (Patient ID, Study Instance UID, Accession
//! Number, whether a Predecessor Documents Sequence is present) out of the
//! first bytes of a dataset, in whatever transfer syntax it came.
//!
//! The relay never decodes a dataset; it only needs these values to group a
//! study, match a result to the study it reports on, and show operators what
//! waits. The scanner looks at a bounded prefix ([`SCAN_LIMIT`]), walks
//! top-level elements in tag order, skips sequences, and stops after
//! (0040,A360). It never fails: a value it cannot find is `None`.
//!
//! [`report_facts`] reads more of a report (an SR or encapsulated
//! document from the reading center): its title, first text, time and
//! observer, descending into its sequences, for urgent-finding notices.

use std::io::Read;

use crate::uids::{DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE};

/// How many leading dataset bytes are kept for scanning.
pub const SCAN_LIMIT: usize = 64 * 1024;

const ACCESSION_NUMBER: u32 = 0x0008_0050;
const MODALITY: u32 = 0x0008_0060;
const BODY_PART_EXAMINED: u32 = 0x0018_0015;
const PATIENT_ID: u32 = 0x0010_0020;
const ISSUER_OF_PATIENT_ID: u32 = 0x0010_0021;
const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
/// Present (with an item) in an SR or encapsulated document that amends an
/// earlier one.
const PREDECESSOR_DOCUMENTS: u32 = 0x0040_A360;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_END: u32 = 0xFFFE_E00D;
const SEQUENCE_END: u32 = 0xFFFE_E0DD;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutingKeys {
    pub patient_id: Option<String>,
    pub study_instance_uid: Option<String>,
    pub accession_number: Option<String>,
    pub issuer_of_patient_id: Option<String>,
    /// A Predecessor Documents Sequence with at least one item was seen.
    pub has_predecessors: bool,
    /// Modality (0008,0060) and Body Part Examined (0018,0015): for the
    /// priors rules (same modality, same body part).
    pub modality: Option<String>,
    pub body_part: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct Syntax {
    explicit: bool,
    big: bool,
}

/// Scans `prefix` (the first bytes of a dataset in `transfer_syntax`).
pub fn routing_keys(transfer_syntax: &str, prefix: &[u8]) -> RoutingKeys {
    let syntax = match transfer_syntax {
        IMPLICIT_VR_LE => Syntax {
            explicit: false,
            big: false,
        },
        EXPLICIT_VR_BE => Syntax {
            explicit: true,
            big: true,
        },
        // Every other standard syntax encodes the dataset in explicit VR LE.
        _ => Syntax {
            explicit: true,
            big: false,
        },
    };
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE {
        let mut inflated = Vec::new();
        // A truncated deflate stream yields what it can before erroring.
        let _ = flate2::read::DeflateDecoder::new(prefix)
            .take(SCAN_LIMIT as u64)
            .read_to_end(&mut inflated);
        return Scanner {
            buf: &inflated,
            syntax,
            found: RoutingKeys::default(),
        }
        .run();
    }
    Scanner {
        buf: prefix,
        syntax,
        found: RoutingKeys::default(),
    }
    .run()
}

struct Scanner<'a> {
    buf: &'a [u8],
    syntax: Syntax,
    found: RoutingKeys,
}

/// One element header: tag, value length (None: undefined), header size.
struct Header {
    tag: u32,
    len: Option<u32>,
    size: usize,
    /// The VR, in explicit syntaxes.
    vr: Option<[u8; 2]>,
}

impl Scanner<'_> {
    fn u16_at(&self, pos: usize) -> Option<u16> {
        let b = self.buf.get(pos..pos + 2)?;
        Some(if self.syntax.big {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    }

    fn u32_at(&self, pos: usize) -> Option<u32> {
        let b = self.buf.get(pos..pos + 4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if self.syntax.big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }

    fn header(&self, pos: usize) -> Option<Header> {
        let tag = (u32::from(self.u16_at(pos)?) << 16) | u32::from(self.u16_at(pos + 2)?);
        let (raw, size, vr) = if (tag >> 16) == 0xFFFE || !self.syntax.explicit {
            (self.u32_at(pos + 4)?, 8, None)
        } else {
            let vr = self.buf.get(pos + 4..pos + 6)?;
            let two = Some([vr[0], vr[1]]);
            match vr {
                b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN"
                | b"UR" | b"UT" | b"UV" => (self.u32_at(pos + 8)?, 12, two),
                _ => (u32::from(self.u16_at(pos + 6)?), 8, two),
            }
        };
        Some(Header {
            tag,
            len: (raw != u32::MAX).then_some(raw),
            size,
            vr,
        })
    }

    /// Skips elements until `end` (an item or sequence delimiter), returning
    /// the position after it. `depth` bounds recursion on hostile input.
    fn skip_until(&self, mut pos: usize, end: u32, depth: u8) -> Option<usize> {
        if depth > 16 {
            return None;
        }
        loop {
            let h = self.header(pos)?;
            pos += h.size;
            if h.tag == end {
                return Some(pos);
            }
            pos = match h.len {
                Some(len) => pos.checked_add(len as usize)?,
                None if h.tag == ITEM => self.skip_until(pos, ITEM_END, depth + 1)?,
                None => self.skip_until(pos, SEQUENCE_END, depth + 1)?,
            };
        }
    }

    fn run(mut self) -> RoutingKeys {
        let mut pos = 0;
        while let Some(h) = self.header(pos) {
            if h.tag > PREDECESSOR_DOCUMENTS || (h.tag >> 16) == 0xFFFE {
                break;
            }
            let start = pos + h.size;
            match h.len {
                Some(len) => {
                    let Some(end) = start.checked_add(len as usize) else {
                        break;
                    };
                    if [
                        PATIENT_ID,
                        STUDY_INSTANCE_UID,
                        ACCESSION_NUMBER,
                        ISSUER_OF_PATIENT_ID,
                        MODALITY,
                        BODY_PART_EXAMINED,
                    ]
                    .contains(&h.tag)
                    {
                        let Some(value) = self.buf.get(start..end) else {
                            break;
                        };
                        let text = String::from_utf8_lossy(value)
                            .trim_end_matches(['\0', ' '])
                            .trim_start()
                            .to_string();
                        match h.tag {
                            PATIENT_ID => self.found.patient_id = Some(text),
                            STUDY_INSTANCE_UID => self.found.study_instance_uid = Some(text),
                            ISSUER_OF_PATIENT_ID => {
                                self.found.issuer_of_patient_id =
                                    Some(text).filter(|t| !t.is_empty())
                            }
                            MODALITY => self.found.modality = Some(text).filter(|t| !t.is_empty()),
                            BODY_PART_EXAMINED => {
                                self.found.body_part = Some(text).filter(|t| !t.is_empty())
                            }
                            _ => self.found.accession_number = Some(text),
                        }
                    }
                    if h.tag == PREDECESSOR_DOCUMENTS && len > 0 {
                        self.found.has_predecessors = true;
                    }
                    pos = end;
                }
                None => match self.skip_until(start, SEQUENCE_END, 0) {
                    Some(p) if h.tag == PREDECESSOR_DOCUMENTS => {
                        // More than the delimiter: at least one item.
                        self.found.has_predecessors = p - start > 8;
                        pos = p;
                    }
                    Some(p) => pos = p,
                    None => break,
                },
            }
        }
        self.found
    }
}

/// What a report says about itself: enough to tell a referring doctor of
/// an urgent finding (PS3.3 SR Document General / Encapsulated Document).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportFacts {
    /// Document Title (0042,0010), or the Code Meaning of the SR's
    /// Concept Name Code Sequence (0040,A043).
    pub title: Option<String>,
    /// The first Text Value (0040,A160) of the SR's content.
    pub text: Option<String>,
    /// Content Date and Time (0008,0023/0033): when the report was made.
    pub content_date: Option<String>,
    pub content_time: Option<String>,
    /// Verifying Observer Name (0040,A075), else the first Person Name
    /// (0040,A123) in the content (the author).
    pub observer: Option<String>,
    /// The coded values of the SR's CODE items (Concept Code Sequence
    /// (0040,A168)), as `SCHEME:VALUE` (e.g. `SCT:36118008`), at most 64.
    pub codes: Vec<String>,
}

/// What the walk keeps between elements.
#[derive(Default)]
struct Scratch {
    person: Option<String>,
    code_value: Option<String>,
    code_scheme: Option<String>,
}

const CONTENT_DATE: u32 = 0x0008_0023;
const CONTENT_TIME: u32 = 0x0008_0033;
const CODE_MEANING: u32 = 0x0008_0104;
const DOCUMENT_TITLE: u32 = 0x0042_0010;
const CONCEPT_NAME_CODE_SEQUENCE: u32 = 0x0040_A043;
const VERIFYING_OBSERVER_NAME: u32 = 0x0040_A075;
const PERSON_NAME: u32 = 0x0040_A123;
const TEXT_VALUE: u32 = 0x0040_A160;
const CODE_VALUE: u32 = 0x0008_0100;
const CODING_SCHEME_DESIGNATOR: u32 = 0x0008_0102;
const CONCEPT_CODE_SEQUENCE: u32 = 0x0040_A168;
/// Sequences a report nests its facts in; in implicit VR nothing else says
/// a defined-length value is a sequence.
const REPORT_SEQUENCES: [u32; 6] = [
    CONCEPT_NAME_CODE_SEQUENCE,
    CONCEPT_CODE_SEQUENCE,
    0x0040_A073, // Verifying Observer Sequence
    0x0040_A078, // Author Observer Sequence
    0x0040_A730, // Content Sequence
    0x0040_A504, // Content Template Sequence
];
/// Longest text kept from a report (a finding, not the whole report).
const MAX_FACT: usize = 1000;

/// Reads [`ReportFacts`] from the first bytes of an SR or encapsulated
/// document. Never fails; walks nested sequences to a bounded depth.
pub fn report_facts(transfer_syntax: &str, prefix: &[u8]) -> ReportFacts {
    let syntax = Syntax {
        explicit: transfer_syntax != IMPLICIT_VR_LE,
        big: transfer_syntax == EXPLICIT_VR_BE,
    };
    let mut inflated = Vec::new();
    let buf = if transfer_syntax == DEFLATED_EXPLICIT_VR_LE {
        let _ = flate2::read::DeflateDecoder::new(prefix)
            .take(SCAN_LIMIT as u64)
            .read_to_end(&mut inflated);
        &inflated[..]
    } else {
        prefix
    };
    let scanner = Scanner {
        buf,
        syntax,
        found: RoutingKeys::default(),
    };
    let mut facts = ReportFacts::default();
    let mut scratch = Scratch::default();
    scanner.facts(0, buf.len(), None, 0, 0, &mut facts, &mut scratch);
    if facts.observer.is_none() {
        facts.observer = scratch.person;
    }
    facts
}

impl Scanner<'_> {
    /// Visits the elements from `pos` to `end` (or to the delimiter
    /// `delimiter`), inside sequence `parent` (0 at the top level); returns
    /// where it stopped.
    #[allow(clippy::too_many_arguments)]
    fn facts(
        &self,
        mut pos: usize,
        end: usize,
        delimiter: Option<u32>,
        parent: u32,
        depth: u8,
        facts: &mut ReportFacts,
        scratch: &mut Scratch,
    ) -> Option<usize> {
        if depth > 16 {
            return None;
        }
        while pos < end {
            let h = self.header(pos)?;
            pos += h.size;
            if Some(h.tag) == delimiter {
                return Some(pos);
            }
            let is_sequence = h.vr == Some(*b"SQ")
                || (h.vr.is_none() && REPORT_SEQUENCES.contains(&h.tag))
                || (h.len.is_none() && h.tag != ITEM);
            if h.tag == ITEM {
                // An item of the sequence we are in.
                scratch.code_value = None;
                scratch.code_scheme = None;
                pos = match h.len {
                    Some(len) => {
                        let item_end = pos.checked_add(len as usize)?.min(end);
                        self.facts(pos, item_end, None, parent, depth + 1, facts, scratch)?;
                        item_end
                    }
                    None => {
                        self.facts(pos, end, Some(ITEM_END), parent, depth + 1, facts, scratch)?
                    }
                };
                if parent == CONCEPT_CODE_SEQUENCE && facts.codes.len() < 64 {
                    if let (Some(s), Some(v)) =
                        (scratch.code_scheme.take(), scratch.code_value.take())
                    {
                        facts.codes.push(format!("{s}:{v}"));
                    }
                }
                continue;
            }
            if is_sequence {
                pos = match h.len {
                    Some(len) => {
                        let seq_end = pos.checked_add(len as usize)?.min(end);
                        self.facts(pos, seq_end, None, h.tag, depth + 1, facts, scratch)?;
                        seq_end
                    }
                    None => self.facts(
                        pos,
                        end,
                        Some(SEQUENCE_END),
                        h.tag,
                        depth + 1,
                        facts,
                        scratch,
                    )?,
                };
                continue;
            }
            let len = h.len? as usize;
            let value_end = pos.checked_add(len)?;
            let value = self.buf.get(pos..value_end)?;
            let text = || {
                let t: String = String::from_utf8_lossy(value)
                    .trim_end_matches(['\0', ' '])
                    .trim_start()
                    .chars()
                    .take(MAX_FACT)
                    .collect();
                Some(t).filter(|t| !t.is_empty())
            };
            match (h.tag, parent) {
                (DOCUMENT_TITLE, 0) => facts.title = text(),
                (CODE_MEANING, CONCEPT_NAME_CODE_SEQUENCE)
                    if depth == 2 && facts.title.is_none() =>
                {
                    facts.title = text()
                }
                (CONTENT_DATE, 0) => facts.content_date = text(),
                (CONTENT_TIME, 0) => facts.content_time = text(),
                (VERIFYING_OBSERVER_NAME, _) if facts.observer.is_none() => facts.observer = text(),
                (PERSON_NAME, _) if scratch.person.is_none() => scratch.person = text(),
                (CODE_VALUE, CONCEPT_CODE_SEQUENCE) => scratch.code_value = text(),
                (CODING_SCHEME_DESIGNATOR, CONCEPT_CODE_SEQUENCE) => scratch.code_scheme = text(),
                (TEXT_VALUE, _) if facts.text.is_none() => facts.text = text(),
                _ => {}
            }
            pos = value_end;
        }
        Some(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn el_explicit(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&group.to_le_bytes());
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(vr);
        v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    fn undefined_sequence_explicit(group: u16, elem: u16, inner: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&group.to_le_bytes());
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(b"SQ\0\0");
        v.extend_from_slice(&u32::MAX.to_le_bytes());
        // one item of undefined length holding `inner`
        v.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        v.extend_from_slice(&u32::MAX.to_le_bytes());
        v.extend_from_slice(inner);
        v.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        v.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        v
    }

    fn sample() -> Vec<u8> {
        let mut ds = el_explicit(0x0008, 0x0005, b"CS", b"ISO_IR 192");
        // a nested sequence before the keys, holding a decoy Patient ID
        ds.extend(undefined_sequence_explicit(
            0x0008,
            0x1140,
            &el_explicit(0x0010, 0x0020, b"LO", b"DECOY "),
        ));
        ds.extend(el_explicit(0x0008, 0x0050, b"SH", b"ACC-1 "));
        ds.extend(el_explicit(0x0008, 0x0060, b"CS", b"CT"));
        ds.extend(el_explicit(0x0010, 0x0010, b"PN", "山田^太郎 ".as_bytes()));
        ds.extend(el_explicit(0x0010, 0x0020, b"LO", b"PID-001 "));
        ds.extend(el_explicit(0x0020, 0x000D, b"UI", b"1.2.3.4\0"));
        ds.extend(el_explicit(0x7FE0, 0x0010, b"OB", b""));
        ds
    }

    #[test]
    fn finds_keys_past_nested_sequences() {
        let k = routing_keys("1.2.840.10008.1.2.1", &sample());
        assert_eq!(k.patient_id.as_deref(), Some("PID-001"));
        assert_eq!(k.study_instance_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(k.accession_number.as_deref(), Some("ACC-1"));
        assert_eq!(k.modality.as_deref(), Some("CT"));
        assert_eq!(k.body_part, None);
        assert!(!k.has_predecessors);
    }

    #[test]
    fn sees_a_predecessor_documents_sequence() {
        let mut ds = sample();
        ds.truncate(ds.len() - 8); // without the pixel data
        let mut amended = ds.clone();
        amended.extend(undefined_sequence_explicit(
            0x0040,
            0xA360,
            &el_explicit(0x0020, 0x000D, b"UI", b"1.2.3.4\0"),
        ));
        let k = routing_keys("1.2.840.10008.1.2.1", &amended);
        assert!(k.has_predecessors);
        assert_eq!(
            k.study_instance_uid.as_deref(),
            Some("1.2.3.4"),
            "the nested UID is not taken"
        );
        // An empty sequence (delimiter only) amends nothing.
        let mut empty = ds;
        empty.extend_from_slice(&[0x40, 0x00, 0x60, 0xA3]);
        empty.extend_from_slice(b"SQ\0\0");
        empty.extend_from_slice(&u32::MAX.to_le_bytes());
        empty.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert!(!routing_keys("1.2.840.10008.1.2.1", &empty).has_predecessors);
    }

    #[test]
    fn implicit_and_deflated() {
        let mut ds = Vec::new();
        for (g, e, v) in [
            (0x0010u16, 0x0020u16, &b"P2"[..]),
            (0x0020, 0x000D, &b"9.8\0"[..]),
        ] {
            ds.extend_from_slice(&g.to_le_bytes());
            ds.extend_from_slice(&e.to_le_bytes());
            ds.extend_from_slice(&(v.len() as u32).to_le_bytes());
            ds.extend_from_slice(v);
        }
        let k = routing_keys(IMPLICIT_VR_LE, &ds);
        assert_eq!(
            (k.patient_id.as_deref(), k.study_instance_uid.as_deref()),
            (Some("P2"), Some("9.8"))
        );

        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&sample()).expect("deflate");
        let k = routing_keys(DEFLATED_EXPLICIT_VR_LE, &z.finish().expect("deflate"));
        assert_eq!(k.study_instance_uid.as_deref(), Some("1.2.3.4"));
    }

    #[test]
    fn every_truncation_is_safe() {
        let ds = sample();
        for cut in 0..ds.len() {
            let k = routing_keys("1.2.840.10008.1.2.1", &ds[..cut]);
            assert_ne!(k.patient_id.as_deref(), Some("DECOY"), "cut at {cut}");
        }
    }

    #[test]
    fn report_facts_come_from_the_sr_tree() {
        let code = |meaning: &[u8]| {
            let mut v = el_explicit(0x0008, 0x0100, b"SH", b"18748-4 ");
            v.extend(el_explicit(0x0008, 0x0104, b"LO", meaning));
            v
        };
        let mut ds = el_explicit(0x0008, 0x0023, b"DA", b"20261123");
        ds.extend(el_explicit(0x0008, 0x0033, b"TM", b"101500"));
        ds.extend(el_explicit(0x0010, 0x0020, b"LO", b"PID-001 "));
        ds.extend(undefined_sequence_explicit(
            0x0040,
            0xA043,
            &code(b"Diagnostic Imaging Report "),
        ));
        ds.extend(undefined_sequence_explicit(
            0x0040,
            0xA073,
            &el_explicit(0x0040, 0xA075, b"PN", b"Sato^Hanako "),
        ));
        // Content: a TEXT item with its own concept name (not the title).
        let mut item = undefined_sequence_explicit(0x0040, 0xA043, &code(b"Finding "));
        // UT has a 4-byte length.
        let text = b"Tension pneumothorax, left. ";
        item.extend([0x40, 0x00, 0x60, 0xA1]);
        item.extend(b"UT\0\0");
        item.extend((text.len() as u32).to_le_bytes());
        item.extend(text);
        // A CODE item: its value in the Concept Code Sequence.
        let mut coded = el_explicit(0x0008, 0x0100, b"SH", b"36118008");
        coded.extend(el_explicit(0x0008, 0x0102, b"SH", b"SCT "));
        coded.extend(el_explicit(0x0008, 0x0104, b"LO", b"Pneumothorax"));
        item.extend(undefined_sequence_explicit(0x0040, 0xA168, &coded));
        ds.extend(undefined_sequence_explicit(0x0040, 0xA730, &item));
        let f = report_facts("1.2.840.10008.1.2.1", &ds);
        assert_eq!(f.codes, vec!["SCT:36118008".to_string()]);
        assert_eq!(f.title.as_deref(), Some("Diagnostic Imaging Report"));
        assert_eq!(f.text.as_deref(), Some("Tension pneumothorax, left."));
        assert_eq!(f.observer.as_deref(), Some("Sato^Hanako"));
        assert_eq!(
            (f.content_date.as_deref(), f.content_time.as_deref()),
            (Some("20261123"), Some("101500"))
        );
        // Routing keys still ignore what is nested.
        assert_eq!(
            routing_keys("1.2.840.10008.1.2.1", &ds)
                .patient_id
                .as_deref(),
            Some("PID-001")
        );
        for cut in 0..ds.len() {
            let _ = report_facts("1.2.840.10008.1.2.1", &ds[..cut]);
            let _ = report_facts(IMPLICIT_VR_LE, &ds[..cut]);
        }
    }
}
