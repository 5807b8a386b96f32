//! The slots' boot entries on the ESP, as systemd-boot sees them.
//!
//! Each slot boots from one signed UKI in `EFI/Linux/` of the ESP, named
//! `kakehashi-<slot>.efi`, with systemd-boot's boot counter in the name
//! while it is being tried (the Boot Loader Specification's automatic boot
//! assessment): `kakehashi-b+1.efi` is to be tried once; systemd-boot makes
//! it `kakehashi-b+0-1.efi` when it starts it; `systemd-bless-boot` renames
//! it `kakehashi-b.efi` (good) once `boot-complete.target` is reached. An
//! entry with no tries left (`+0-N`) is bad: systemd-boot sorts it last,
//! after every other entry, so the other slot boots.
//!
//! A slot's version is read from its UKI's `.osrel` section (the image's
//! os-release, `IMAGE_VERSION`): what systemd-boot orders entries by.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The two slots of the A/B layout.
pub const SLOTS: [&str; 2] = ["a", "b"];

/// What a slot's boot entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// No counter: it booted and passed its health check (blessed).
    Good,
    /// Being tried: `left` boots left, `done` made.
    Trying { left: u32, done: u32 },
    /// No tries left: it failed every try; systemd-boot boots it last.
    Bad { done: u32 },
    /// No entry: never installed, or taken away while its slot was written.
    Missing,
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotState::Good => write!(f, "good"),
            SlotState::Trying { left, done } => {
                write!(f, "trying ({left} boot(s) left, {done} made)")
            }
            SlotState::Bad { done } => write!(f, "bad (failed {done} boot(s))"),
            SlotState::Missing => write!(f, "no boot entry"),
        }
    }
}

/// One `kakehashi-<slot>[+LEFT[-DONE]].efi` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub slot: String,
    pub file: String,
    /// `(left, done)` while counted.
    pub counter: Option<(u32, u32)>,
}

impl Entry {
    pub fn state(&self) -> SlotState {
        match self.counter {
            None => SlotState::Good,
            Some((0, done)) => SlotState::Bad { done },
            Some((left, done)) => SlotState::Trying { left, done },
        }
    }
}

/// Parses an entry's file name; `None` for any other file.
pub fn parse_entry(file: &str) -> Option<Entry> {
    let stem = file.strip_suffix(".efi")?.strip_prefix("kakehashi-")?;
    let (slot, counter) = match stem.split_once('+') {
        None => (stem, None),
        Some((slot, count)) => {
            let (left, done) = match count.split_once('-') {
                Some((l, d)) => (l, d),
                None => (count, "0"),
            };
            let number = |s: &str| {
                (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| s.parse::<u32>().ok())
                    .flatten()
            };
            (slot, Some((number(left)?, number(done)?)))
        }
    };
    SLOTS.contains(&slot).then(|| Entry {
        slot: slot.to_string(),
        file: file.to_string(),
        counter,
    })
}

/// The entries found in `dir` (the ESP's `EFI/Linux`), by slot. Two files
/// for one slot (a rename cut by the power) is an error naming both.
pub fn scan(dir: &Path) -> Result<BTreeMap<String, Entry>, String> {
    let mut out: BTreeMap<String, Entry> = BTreeMap::new();
    let list = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for item in list {
        let item = item.map_err(|e| format!("{}: {e}", dir.display()))?;
        let Some(entry) = item.file_name().to_str().and_then(parse_entry) else {
            continue;
        };
        if let Some(other) = out.get(&entry.slot) {
            return Err(format!(
                "{}: two boot entries for slot {}: {} and {}",
                dir.display(),
                entry.slot,
                other.file,
                entry.file
            ));
        }
        out.insert(entry.slot.clone(), entry);
    }
    Ok(out)
}

/// The `.osrel` section of a PE image (a UKI): the os-release it carries.
pub fn osrel(path: &Path) -> Result<String, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |what: &str| format!("{}: not a UKI ({what})", path.display());
    let mut read_at = |at: u64, buf: &mut [u8]| -> Result<(), String> {
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(buf))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut dos = [0u8; 64];
    read_at(0, &mut dos)?;
    if &dos[0..2] != b"MZ" {
        return Err(bad("no MZ header"));
    }
    let pe = u64::from(u32::from_le_bytes([dos[60], dos[61], dos[62], dos[63]]));
    let mut coff = [0u8; 24];
    read_at(pe, &mut coff)?;
    if &coff[0..4] != b"PE\0\0" {
        return Err(bad("no PE signature"));
    }
    let sections = u16::from_le_bytes([coff[6], coff[7]]);
    let optional = u16::from_le_bytes([coff[20], coff[21]]);
    let table = pe + 24 + u64::from(optional);
    for i in 0..u64::from(sections.min(96)) {
        let mut s = [0u8; 40];
        read_at(table + 40 * i, &mut s)?;
        if &s[0..8] != b".osrel\0\0" {
            continue;
        }
        let le = |o: usize| u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]]);
        let (virtual_size, raw_size, raw_at) = (le(8), le(16), le(20));
        let len = virtual_size.min(raw_size).min(64 * 1024) as usize;
        let mut text = vec![0u8; len];
        read_at(u64::from(raw_at), &mut text)?;
        let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
        return String::from_utf8(text[..end].to_vec()).map_err(|_| bad(".osrel is not UTF-8"));
    }
    Err(bad("no .osrel section"))
}

/// `KEY`'s value in os-release text (quotes removed).
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

/// One slot as `kakehashi appliance slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotReport {
    pub slot: String,
    /// "good", "trying (…)", "bad (…)", "no boot entry".
    pub state: String,
    /// `IMAGE_VERSION` of the slot's UKI, when it has one.
    pub version: Option<String>,
    /// This boot came from this slot (`kakehashi.slot=` on the command line).
    pub booted: bool,
    /// Why the version could not be read, if it could not.
    pub problem: Option<String>,
}

/// Both slots: their entries in `linux_dir` (the ESP's `EFI/Linux`) and
/// which one `cmdline` (the kernel's command line) booted.
pub fn slots(linux_dir: &Path, cmdline: &str) -> Result<Vec<SlotReport>, String> {
    let entries = scan(linux_dir)?;
    let booted = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kakehashi.slot="));
    Ok(SLOTS
        .iter()
        .map(|slot| {
            let entry = entries.get(*slot);
            let (version, problem) = match entry {
                Some(e) => match osrel(&linux_dir.join(&e.file)) {
                    Ok(text) => (os_release_value(&text, "IMAGE_VERSION"), None),
                    Err(e) => (None, Some(e)),
                },
                None => (None, None),
            };
            SlotReport {
                slot: slot.to_string(),
                state: entry.map_or(SlotState::Missing, Entry::state).to_string(),
                version,
                booted: booted == Some(*slot),
                problem,
            }
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn entry_names_follow_boot_counting() {
        let e = |n: &str| parse_entry(n).map(|x| (x.slot.clone(), x.state()));
        assert_eq!(e("kakehashi-a.efi"), Some(("a".into(), SlotState::Good)));
        assert_eq!(
            e("kakehashi-b+1.efi"),
            Some(("b".into(), SlotState::Trying { left: 1, done: 0 }))
        );
        assert_eq!(
            e("kakehashi-b+2-1.efi"),
            Some(("b".into(), SlotState::Trying { left: 2, done: 1 }))
        );
        assert_eq!(
            e("kakehashi-a+0-1.efi"),
            Some(("a".into(), SlotState::Bad { done: 1 }))
        );
        for other in [
            "kakehashi-c.efi",
            "kakehashi-a+.efi",
            "kakehashi-a+x-1.efi",
            "kakehashi-a+1-.efi",
            "kakehashi-a+-1.efi",
            "kakehashi-a.efi.new",
            "BOOTX64.EFI",
        ] {
            assert_eq!(parse_entry(other), None, "{other}");
        }
    }

    #[test]
    fn a_scan_finds_each_slot_once_and_names_a_doubled_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["kakehashi-a.efi", "kakehashi-b+0-1.efi", "other.efi"] {
            std::fs::write(dir.path().join(f), b"").expect("write");
        }
        let found = scan(dir.path()).expect("scan");
        assert_eq!(found["a"].state(), SlotState::Good);
        assert_eq!(found["b"].state(), SlotState::Bad { done: 1 });
        std::fs::write(dir.path().join("kakehashi-b+1.efi"), b"").expect("write");
        let err = scan(dir.path()).expect_err("two entries for b");
        assert!(err.contains("two boot entries for slot b"), "{err}");
    }

    /// A PE file with the sections given, as objcopy lays out a UKI.
    pub(crate) fn pe_with(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let pe_at = 128usize;
        let optional = 240usize;
        let table = pe_at + 24 + optional;
        let mut data_at = table + 40 * sections.len();
        let mut out = vec![0u8; data_at];
        out[0..2].copy_from_slice(b"MZ");
        out[60..64].copy_from_slice(&(pe_at as u32).to_le_bytes());
        out[pe_at..pe_at + 4].copy_from_slice(b"PE\0\0");
        out[pe_at + 6..pe_at + 8].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        out[pe_at + 20..pe_at + 22].copy_from_slice(&(optional as u16).to_le_bytes());
        for (i, (name, bytes)) in sections.iter().enumerate() {
            let s = table + 40 * i;
            out[s..s + name.len()].copy_from_slice(name.as_bytes());
            let raw = bytes.len().div_ceil(512) * 512;
            out[s + 8..s + 12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            out[s + 16..s + 20].copy_from_slice(&(raw as u32).to_le_bytes());
            out[s + 20..s + 24].copy_from_slice(&(data_at as u32).to_le_bytes());
            out.resize(data_at + raw, 0);
            out[data_at..data_at + bytes.len()].copy_from_slice(bytes);
            data_at += raw;
        }
        out
    }

    #[test]
    fn the_version_is_read_from_the_uki_osrel_section() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uki = dir.path().join("kakehashi-a.efi");
        let text = b"NAME=\"Debian GNU/Linux\"\nIMAGE_ID=kakehashi\nIMAGE_VERSION=\"0.2.0+abc\"\n";
        std::fs::write(
            &uki,
            pe_with(&[(".text", b"code"), (".osrel", text), (".cmdline", b"ro")]),
        )
        .expect("write");
        let text = osrel(&uki).expect("osrel");
        assert_eq!(
            os_release_value(&text, "IMAGE_VERSION").as_deref(),
            Some("0.2.0+abc")
        );
        assert_eq!(
            os_release_value(&text, "IMAGE_ID").as_deref(),
            Some("kakehashi")
        );
        assert_eq!(os_release_value(&text, "VERSION_ID"), None);

        std::fs::write(&uki, pe_with(&[(".text", b"code")])).expect("write");
        assert!(osrel(&uki).expect_err("none").contains("no .osrel section"));
        std::fs::write(
            &uki,
            b"not a PE file at all, but long enough to have a DOS header .....",
        )
        .expect("write");
        assert!(osrel(&uki).expect_err("not PE").contains("no MZ header"));
        std::fs::write(&uki, b"MZ").expect("write");
        assert!(osrel(&uki).is_err(), "short");
    }

    #[test]
    fn both_slots_are_reported_with_their_versions_and_the_booted_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("kakehashi-a.efi"),
            pe_with(&[(".osrel", b"IMAGE_VERSION=0.1.0\n")]),
        )
        .expect("write");
        std::fs::write(dir.path().join("kakehashi-b+0-1.efi"), b"MZ broken").expect("write");
        let r = slots(dir.path(), "root=/dev/mapper/root kakehashi.slot=a ro").expect("slots");
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].state.as_str(), r[0].version.as_deref(), r[0].booted),
            ("good", Some("0.1.0"), true)
        );
        assert_eq!(
            (r[1].state.as_str(), r[1].booted),
            ("bad (failed 1 boot(s))", false)
        );
        assert!(r[1]
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("not a UKI") || p.contains("kakehashi-b")));
        std::fs::remove_file(dir.path().join("kakehashi-b+0-1.efi")).expect("rm");
        let r = slots(dir.path(), "kakehashi.slot=b").expect("slots");
        assert_eq!(
            (r[1].state.as_str(), r[1].booted, r[0].booted),
            ("no boot entry", true, false)
        );
    }
}
