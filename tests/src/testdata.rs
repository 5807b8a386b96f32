//! Generates DICOM Part 10 files for tests, the demo and benchmarks: any
//! modality, size and transfer syntax, Japanese names in ISO_IR 192 and
//! ISO 2022 IR 87. Encapsulated syntaxes carry opaque fragments (the relay
//! never decodes pixel data, and neither does DCMTK's storescu/storescp +B).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Transfer syntaxes the generator can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    ImplicitLe,
    ExplicitLe,
    ExplicitBe,
    Deflated,
    /// An encapsulated syntax (JPEG, JPEG-LS, JPEG 2000, RLE…) by UID.
    Encapsulated(&'static str),
}

impl Syntax {
    pub fn uid(self) -> &'static str {
        match self {
            Syntax::ImplicitLe => "1.2.840.10008.1.2",
            Syntax::ExplicitLe => "1.2.840.10008.1.2.1",
            Syntax::ExplicitBe => "1.2.840.10008.1.2.2",
            Syntax::Deflated => "1.2.840.10008.1.2.1.99",
            Syntax::Encapsulated(uid) => uid,
        }
    }
}

pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
pub const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
pub const JPEG_LOSSLESS_SV1: &str = "1.2.840.10008.1.2.4.70";
pub const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";
pub const JPEG_2000_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
pub const JPEG_2000: &str = "1.2.840.10008.1.2.4.91";
pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

pub const CT_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const MR_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
pub const CR_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.1";
pub const US_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.6.1";
pub const NM_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.20";
pub const MG_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.1.2";
pub const SC_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.7";
pub const PET_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.128";

/// Patient names as their character set encodes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Ascii,
    /// ISO_IR 192 (UTF-8): 山田^太郎=やまだ^たろう
    Utf8,
    /// ISO 2022 IR 87 with escape sequences (PS3.5 H.3.1's example).
    Iso2022Jp,
}

impl Name {
    fn charset(self) -> &'static [u8] {
        match self {
            Name::Ascii => b"ISO_IR 6",
            Name::Utf8 => b"ISO_IR 192",
            Name::Iso2022Jp => b"\\ISO 2022 IR 87",
        }
    }
    pub fn bytes(self) -> Vec<u8> {
        match self {
            Name::Ascii => b"Doe^Jane".to_vec(),
            Name::Utf8 => "山田^太郎=やまだ^たろう".as_bytes().to_vec(),
            Name::Iso2022Jp => b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B".to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub modality: &'static str,
    pub sop_class: &'static str,
    pub syntax: Syntax,
    pub name: Name,
    pub patient_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uid: String,
    pub instance_number: u32,
    /// Bytes of pixel data (native) or of fragments (encapsulated).
    pub pixel_bytes: usize,
}

struct Enc {
    explicit: bool,
    big: bool,
    out: Vec<u8>,
}

const LONG_VRS: [&[u8; 2]; 7] = [b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"OF"];

impl Enc {
    fn u16(&mut self, v: u16) {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out.extend_from_slice(&b);
    }
    fn u32(&mut self, v: u32) {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.out.extend_from_slice(&b);
    }
    fn header(&mut self, g: u16, e: u16, vr: &[u8; 2], len: u32) {
        self.u16(g);
        self.u16(e);
        if self.explicit {
            self.out.extend_from_slice(vr);
            if LONG_VRS.contains(&vr) {
                self.out.extend_from_slice(&[0, 0]);
                self.u32(len);
            } else {
                self.u16(len as u16);
            }
        } else {
            self.u32(len);
        }
    }
    fn text(&mut self, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
        let mut v = value.to_vec();
        if v.len() % 2 == 1 {
            v.push(if vr == b"UI" { 0 } else { b' ' });
        }
        self.header(g, e, vr, v.len() as u32);
        self.out.extend_from_slice(&v);
    }
    fn us(&mut self, g: u16, e: u16, v: u16) {
        self.header(g, e, b"US", 2);
        self.u16(v);
    }
    /// Delimiter items (FFFE,xxxx) have no VR in any syntax.
    fn item_tag(&mut self, e: u16, len: u32) {
        self.u16(0xFFFE);
        self.u16(e);
        self.u32(len);
    }
}

/// Deterministic filler bytes (xorshift), so sizes are real but cheap.
fn fill(out: &mut Vec<u8>, n: usize, seed: u64) {
    let mut x = seed | 1;
    out.reserve(n);
    let mut left = n;
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        let k = left.min(8);
        out.extend_from_slice(&b[..k]);
        left -= k;
    }
}

/// The dataset bytes of `spec`, encoded in its transfer syntax.
pub fn dataset(spec: &Spec) -> Vec<u8> {
    let (explicit, big) = match spec.syntax {
        Syntax::ImplicitLe => (false, false),
        Syntax::ExplicitBe => (true, true),
        _ => (true, false),
    };
    let mut e = Enc {
        explicit,
        big,
        out: Vec::with_capacity(spec.pixel_bytes + 2048),
    };
    e.text(0x0008, 0x0005, b"CS", spec.name.charset());
    e.text(0x0008, 0x0016, b"UI", spec.sop_class.as_bytes());
    e.text(0x0008, 0x0018, b"UI", spec.sop_uid.as_bytes());
    e.text(0x0008, 0x0020, b"DA", b"20261122");
    e.text(
        0x0008,
        0x0050,
        b"SH",
        format!("ACC{}", spec.patient_id).as_bytes(),
    );
    e.text(0x0008, 0x0060, b"CS", spec.modality.as_bytes());
    // A sequence before the patient module: the relay's header scan must
    // skip it. Explicit length, as DCMTK re-encodes sequences on send anyway
    // (undefined lengths are covered by the scanner's unit tests).
    let item_len: u32 = 2 * (8 + 6); // two short elements: 8-byte header + 6-byte value
    e.header(0x0008, 0x1032, b"SQ", 8 + item_len);
    e.item_tag(0xE000, item_len);
    e.text(0x0008, 0x0100, b"SH", b"RPID16");
    e.text(0x0008, 0x0102, b"SH", b"RADLEX");
    e.text(0x0010, 0x0010, b"PN", &spec.name.bytes());
    e.text(0x0010, 0x0020, b"LO", spec.patient_id.as_bytes());
    e.text(0x0020, 0x000D, b"UI", spec.study_uid.as_bytes());
    e.text(0x0020, 0x000E, b"UI", spec.series_uid.as_bytes());
    e.text(
        0x0020,
        0x0013,
        b"IS",
        spec.instance_number.to_string().as_bytes(),
    );
    let cols: usize = if spec.pixel_bytes / 1024 <= 65_535 {
        512
    } else {
        8192
    };
    let rows = (spec.pixel_bytes / (cols * 2)).max(1);
    e.us(0x0028, 0x0002, 1);
    e.text(0x0028, 0x0004, b"CS", b"MONOCHROME2");
    e.us(0x0028, 0x0010, rows as u16);
    e.us(0x0028, 0x0011, cols as u16);
    e.us(0x0028, 0x0100, 16);
    e.us(0x0028, 0x0101, 16);
    e.us(0x0028, 0x0102, 15);
    e.us(0x0028, 0x0103, 0);
    let seed = spec.sop_uid.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    match spec.syntax {
        Syntax::Encapsulated(_) => {
            e.header(0x7FE0, 0x0010, b"OB", u32::MAX);
            e.item_tag(0xE000, 0); // empty basic offset table
            let mut frag = vec![0xFF, 0xD8];
            fill(&mut frag, (spec.pixel_bytes.max(4) - 2) & !1, seed);
            e.item_tag(0xE000, frag.len() as u32);
            e.out.extend_from_slice(&frag);
            e.item_tag(0xE0DD, 0);
        }
        _ => {
            let n = rows * cols * 2;
            e.header(0x7FE0, 0x0010, b"OW", n as u32);
            if big {
                // OW in big endian: swap the 16-bit words (filler is filler, but keep it honest)
                let mut px = Vec::new();
                fill(&mut px, n, seed);
                e.out.extend_from_slice(&px);
            } else {
                fill(&mut e.out, n, seed);
            }
        }
    }
    if spec.syntax == Syntax::Deflated {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing to a Vec cannot fail.
        z.write_all(&e.out).expect("deflate to memory");
        let mut out = z.finish().expect("deflate to memory");
        if out.len() % 2 == 1 {
            out.push(0);
        }
        return out;
    }
    e.out
}

/// Writes `spec` as a Part 10 file.
pub fn write_file(path: &Path, spec: &Spec) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&kakehashi_dicom::part10::file_meta(
        spec.sop_class,
        &spec.sop_uid,
        spec.syntax.uid(),
        "TESTDATA",
    ))?;
    f.write_all(&dataset(spec))?;
    f.flush()
}

/// The dataset bytes of a Part 10 file (everything after group 0002).
pub fn dataset_of_file(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.get(128..132)? != b"DICM" {
        return None;
    }
    let gl = u32::from_le_bytes(bytes.get(140..144)?.try_into().ok()?) as usize;
    bytes.get(144 + gl..)
}

/// A study of `count` instances of one modality, written into `dir`.
#[allow(clippy::too_many_arguments)]
pub fn study(
    dir: &Path,
    tag: &str,
    modality: &'static str,
    sop_class: &'static str,
    syntax: Syntax,
    name: Name,
    count: usize,
    pixel_bytes: usize,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let root = format!(
        "2.25.{}",
        1000 + tag
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % 1_000_000_007
    );
    let mut out = Vec::new();
    for i in 0..count {
        let spec = Spec {
            modality,
            sop_class,
            syntax,
            name,
            patient_id: format!("PID-{tag}"),
            study_uid: format!("{root}.1"),
            series_uid: format!("{root}.1.1"),
            sop_uid: format!("{root}.1.1.{}", i + 1),
            instance_number: (i + 1) as u32,
            pixel_bytes,
        };
        let path = dir.join(format!("{tag}-{:05}.dcm", i + 1));
        write_file(&path, &spec)?;
        out.push(path);
    }
    Ok(out)
}

/// A varied hospital day: several modalities, transfer syntaxes and both
/// Japanese character sets, a few instances each. Returns every file.
/// A CT study in explicit VR little endian with UTF-8 names: `count`
/// instances of about `size` bytes each.
pub fn ct_study(dir: &Path, tag: &str, count: usize, size: usize) -> Vec<PathBuf> {
    study(
        dir,
        tag,
        "CT",
        CT_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        count,
        size,
    )
    .expect("test data")
}

pub fn varied_set(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let plan: [(&str, &'static str, &'static str, Syntax, Name, usize, usize); 12] = [
        (
            "ct-implicit",
            "CT",
            CT_IMAGE,
            Syntax::ImplicitLe,
            Name::Utf8,
            3,
            512 * 1024,
        ),
        (
            "mr-explicit",
            "MR",
            MR_IMAGE,
            Syntax::ExplicitLe,
            Name::Iso2022Jp,
            3,
            128 * 1024,
        ),
        (
            "cr-jpeg",
            "CR",
            CR_IMAGE,
            Syntax::Encapsulated(JPEG_BASELINE),
            Name::Ascii,
            2,
            200 * 1024,
        ),
        (
            "sc-jpeg-ext",
            "OT",
            SC_IMAGE,
            Syntax::Encapsulated(JPEG_EXTENDED),
            Name::Utf8,
            1,
            64 * 1024,
        ),
        (
            "nm-lossless",
            "NM",
            NM_IMAGE,
            Syntax::Encapsulated(JPEG_LOSSLESS_SV1),
            Name::Iso2022Jp,
            2,
            96 * 1024,
        ),
        (
            "us-jpegls",
            "US",
            US_IMAGE,
            Syntax::Encapsulated(JPEG_LS_LOSSLESS),
            Name::Utf8,
            2,
            80 * 1024,
        ),
        (
            "mg-j2k",
            "MG",
            MG_IMAGE,
            Syntax::Encapsulated(JPEG_2000_LOSSLESS),
            Name::Iso2022Jp,
            2,
            1024 * 1024,
        ),
        (
            "pt-j2k",
            "PT",
            PET_IMAGE,
            Syntax::Encapsulated(JPEG_2000),
            Name::Ascii,
            2,
            64 * 1024,
        ),
        (
            "ct-rle",
            "CT",
            CT_IMAGE,
            Syntax::Encapsulated(RLE_LOSSLESS),
            Name::Utf8,
            2,
            128 * 1024,
        ),
        (
            "mr-deflate",
            "MR",
            MR_IMAGE,
            Syntax::Deflated,
            Name::Iso2022Jp,
            2,
            64 * 1024,
        ),
        (
            "ct-bigendian",
            "CT",
            CT_IMAGE,
            Syntax::ExplicitBe,
            Name::Ascii,
            1,
            32 * 1024,
        ),
        (
            "cr-tiny",
            "CR",
            CR_IMAGE,
            Syntax::ExplicitLe,
            Name::Utf8,
            1,
            2,
        ),
    ];
    let mut all = Vec::new();
    for (tag, modality, class, syntax, name, count, size) in plan {
        all.extend(study(
            &dir.join(tag),
            tag,
            modality,
            class,
            syntax,
            name,
            count,
            size,
        )?);
    }
    Ok(all)
}

/// Runs a DCMTK tool; panics with its output if it fails.
pub fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("run DCMTK tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Basic Text SR (`xml2dsr`) for study `study_uid` of patient
/// `patient_id`, whose finding (a TEXT item) is `finding`; with `observer`
/// ("Last^First") it is verified by that physician; with `code` (scheme,
/// value, meaning) it also holds that coded finding (a CODE item).
pub fn sr_report(
    dir: &Path,
    name: &str,
    study_uid: &str,
    patient_id: &str,
    finding: &str,
    observer: Option<&str>,
    code: Option<(&str, &str, &str)>,
) -> PathBuf {
    let code = code
        .map(|(scheme, value, meaning)| {
            format!(
                "<code><relationship>CONTAINS</relationship>\
                 <concept><value>121071</value><scheme><designator>DCM</designator></scheme><meaning>Finding</meaning></concept>\
                 <value>{value}</value><scheme><designator>{scheme}</designator></scheme><meaning>{meaning}</meaning></code>"
            )
        })
        .unwrap_or_default();
    let verification = match observer {
        Some(o) => {
            let (last, first) = o.split_once('^').unwrap_or((o, ""));
            format!(
                "<verification flag=\"VERIFIED\"><observer><datetime>2026-11-23T12:00:00</datetime><name><first>{first}</first><last>{last}</last></name><organization>Reading Center</organization></observer></verification>"
            )
        }
        None => "<verification flag=\"UNVERIFIED\"/>".to_string(),
    };
    // A different series and instance per report name.
    let n: u32 = name.bytes().map(u32::from).sum();
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<report type="Basic Text SR">
<sopclass uid="1.2.840.10008.5.1.4.1.1.88.11">BasicTextSRStorage</sopclass>
<charset>ISO_IR 192</charset>
<modality>SR</modality>
<device><manufacturer>Reading Center</manufacturer><model>test</model></device>
<patient><id>{patient_id}</id><name><last>山田</last><first>太郎</first></name></patient>
<study uid="{study_uid}"></study>
<series uid="{study_uid}.77{n}"><number>77</number></series>
<instance uid="{study_uid}.77{n}.1"><number>1</number></instance>
<document>
<completion flag="COMPLETE"/>
{verification}
<content>
<date>20261123</date><time>120000</time>
<container flag="SEPARATE">
<concept><value>11528-7</value><scheme><designator>LN</designator></scheme><meaning>Radiology Report</meaning></concept>
<text><relationship>CONTAINS</relationship>
<concept><value>121071</value><scheme><designator>DCM</designator></scheme><meaning>Finding</meaning></concept>
<value>{finding}</value></text>
{code}
</container>
</content>
</document>
</report>
"#
    );
    let path = dir.join(format!("{name}.xml"));
    std::fs::write(&path, xml).expect("write xml");
    let out = dir.join(format!("{name}.dcm"));
    run_ok(std::process::Command::new("xml2dsr").arg(&path).arg(&out));
    out
}

/// Study Instance UID of a Part 10 file in explicit VR little endian.
pub fn study_uid_of_file(file: &[u8]) -> String {
    let ds = dataset_of_file(file).expect("Part 10");
    kakehashi_dicom::scan::routing_keys("1.2.840.10008.1.2.1", ds)
        .study_instance_uid
        .expect("study uid")
}
