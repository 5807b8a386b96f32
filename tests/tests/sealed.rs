//! The spool at rest: sealed payloads, no patient name or ID in clear, a
//! tampered file that is dead-lettered as "integrity" and never sent (or,
//! for a large instance checked as it is streamed, never delivered), and
//! re-sends told from corrections by their bytes (sealed payloads have no
//! digest).
//! Uses the software key store (same sealing as with a TPM; the TPM path is
//! in provision.rs).

use std::path::Path;
use std::time::Duration;

use kakehashi_control::RouteState;
use kakehashi_systest::testdata::{self, Name};
use kakehashi_systest::*;

/// kakehashid with provisioned software keys, forwarding to `center_port`.
fn sealed_relay(keys: &Path, center_port: u16) -> Relay {
    Relay::start(RelayOptions::to(center_port).with_software_keys(keys))
}

/// The dataset of a Part 10 file.
fn dataset(file: &[u8]) -> Vec<u8> {
    testdata::dataset_of_file(file)
        .expect("a Part 10 file")
        .to_vec()
}

/// Flips one bit of the byte at `at` in `path` (a payload at rest).
fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("the payload's file");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).expect("read");
    byte[0] ^= 0x01;
    file.write_all_at(&byte, at).expect("tamper");
}

/// Waits until nothing is queued and one instance is dead-lettered; checks
/// that it was for integrity (authentication failed).
fn wait_for_one_integrity_dead_letter(relay: &Relay) {
    wait_until(
        "the others delivered, one dead-lettered",
        Duration::from_secs(120),
        || {
            let d = &relay.status().destinations[0];
            d.queued == 0 && d.dead_letter == 1
        },
    );
    let dead = relay.request(&kakehashi_control::Request::QueueList {
        destination: None,
        dead_only: true,
        limit: None,
    });
    let kakehashi_control::Response::Queue { entries, .. } = dead else {
        panic!("{dead:?}")
    };
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].state, RouteState::DeadLetter);
    let why = entries[0].last_error.clone().unwrap_or_default();
    assert!(
        why.starts_with("integrity:") && why.contains("authentication"),
        "{why}"
    );
}

/// Every file under `dir`, recursively.
fn all_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
        }
    }
    out
}

#[test]
fn no_patient_name_or_id_in_clear_on_disk() {
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let relay = sealed_relay(keys.path(), free_port());
    let files = testdata::ct_study(data.path(), "sealed", 6, 128 * 1024);
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);
    assert_eq!(
        relay.queued(),
        files.len() as u64,
        "the center is down: all queued"
    );
    let status = relay.status();
    let k = status.tpm.expect("key status");
    assert!(
        k.warning
            .as_deref()
            .is_some_and(|w| w.contains("software key store")),
        "{k:?}"
    );
    assert!(relay.log_text().contains("software key store"));

    let name = Name::Utf8.bytes();
    let id = b"PID-sealed";
    let spooled = all_bytes(&relay.spool_dir());
    // Every payload is in there (in a segment file), with the index.
    let on_disk: usize = spooled.iter().map(|(_, b)| b.len()).sum();
    let sent: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).expect("sent file").len())
        .sum();
    assert!(on_disk as u64 > sent, "payloads and index are there");
    for (path, bytes) in &spooled {
        assert!(
            !bytes.windows(name.len()).any(|w| w == name.as_slice()),
            "patient name in clear in {}",
            path.display()
        );
        assert!(
            !bytes.windows(id.len()).any(|w| w == id),
            "patient ID in clear in {}",
            path.display()
        );
    }
    // The same search does find them in the files the hospital sent.
    let original = read(&files[0]);
    assert!(original.windows(id.len()).any(|w| w == id));
    // The operator still sees the Patient ID (the daemon holds the key).
    let list = String::from_utf8_lossy(&relay.cli(&["queue", "list"]).stdout).to_string();
    assert!(list.contains("PID-sealed"), "{list}");
}

#[test]
fn a_flipped_byte_is_dead_lettered_as_integrity_and_never_sent() {
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let center_port = free_port();
    let relay = sealed_relay(keys.path(), center_port);
    let files = testdata::ct_study(data.path(), "flip", 3, 200 * 1024);
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);

    // Flip one byte in the middle of one payload while the center is down:
    // the first frame of the first segment (its payload starts after the
    // 512-byte frame header and is 200 KiB long).
    flip_byte(&relay.spool_dir().join("seg/00000000.seg"), 512 + 100_000);

    let center = StoreScp::start(center_port);
    wait_for_one_integrity_dead_letter(&relay);
    assert_eq!(center.files().len(), files.len() - 1);
    assert_eq!(
        center.store_requests(),
        files.len() - 1,
        "the tampered instance was never sent"
    );
    let audit =
        String::from_utf8_lossy(&relay.cli(&["audit", "--limit", "1000"]).stdout).to_string();
    assert!(
        audit.contains("dead-letter")
            || audit.contains("dead_letter")
            || audit.contains("integrity"),
        "{audit}"
    );
}

/// A large instance is not checked before its C-STORE starts but as it is
/// streamed, and its last fragment leaves only once the whole payload has
/// authenticated. Here its final chunk is altered: the forwarder sends the
/// rest, then aborts the association instead of the last fragment; the
/// center (a real storescp) discards what it got, and the instance is
/// dead-lettered as "integrity". The intact one next to it arrives whole.
#[test]
fn a_streamed_instance_altered_in_its_last_chunk_never_reaches_the_center() {
    const SIZE: usize = 6 * 1024 * 1024;
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let center_port = free_port();
    let mut opts = RelayOptions::to(center_port).with_software_keys(keys.path());
    // 4 MiB segments: each instance is a payload file of its own.
    opts.max_size = "256 MiB".into();
    let relay = Relay::start(opts);
    let files = testdata::ct_study(data.path(), "streamed", 2, SIZE);
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(out.acked.len(), 2, "{}", out.output);

    // The first one received has the lower id: its file sorts first.
    let mut payloads: Vec<_> = std::fs::read_dir(relay.spool_dir().join("data"))
        .expect("payload files")
        .map(|e| e.expect("entry").path())
        .collect();
    payloads.sort();
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    let len = std::fs::metadata(&payloads[0]).expect("size").len();
    flip_byte(&payloads[0], len - 100);

    let center = StoreScp::start(center_port);
    wait_for_one_integrity_dead_letter(&relay);
    assert_eq!(
        center.store_requests(),
        2,
        "the altered instance's C-STORE was begun (streamed), then aborted"
    );
    let arrived = center.files();
    assert_eq!(arrived.len(), 1, "the altered instance reached the center");
    assert_eq!(
        dataset(&std::fs::read(&arrived[0]).expect("read")),
        dataset(&std::fs::read(&files[1]).expect("read")),
        "the intact one arrived whole"
    );
}

#[test]
fn a_sealed_spool_tells_a_resend_from_a_correction_by_its_bytes() {
    // Sealed payloads are not hashed: an instance that comes again while
    // its first copy is spooled is compared with it byte for byte, here
    // across a kill -9 (the first copies are read back from the spool).
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let center_port = free_port();
    let mut relay = sealed_relay(keys.path(), center_port);
    let files = testdata::ct_study(data.path(), "again", 4, 200 * 1024);
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(out.acked.len(), 4, "{}", out.output);
    relay.kill9();
    relay.restart();

    // The PACS sends two of them again, byte-identical: acknowledged, not queued.
    let out = storescu(relay.port, "MODALITY1", &files[..2]);
    assert_eq!(out.acked.len(), 2, "{}", out.output);
    assert_eq!(relay.queued(), 4);
    // Then a corrected third one: same UID, same size, its last byte changed.
    let mut bytes = read(&files[2]);
    *bytes.last_mut().expect("bytes") ^= 0x5a;
    let fixed = data.path().join("fixed.dcm");
    std::fs::write(&fixed, &bytes).expect("write");
    let out = storescu(relay.port, "MODALITY1", std::slice::from_ref(&fixed));
    assert_eq!(out.acked.len(), 1, "{}", out.output);
    assert_eq!(relay.queued(), 4, "the correction replaced the queued copy");

    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.store_requests(), 4, "each instance sent once");
    let arrived: Vec<Vec<u8>> = center.files().iter().map(|p| dataset(&read(p))).collect();
    assert!(
        arrived.contains(&dataset(&bytes)),
        "the corrected version arrived"
    );
    assert!(!arrived.contains(&dataset(&read(&files[2]))));
    let events: Vec<_> = relay.audit().into_iter().map(|a| a.event).collect();
    let count = |e| events.iter().filter(|x| **x == e).count();
    use kakehashi_control::AuditEvent::{Duplicate, Superseded};
    assert_eq!((count(Duplicate), count(Superseded)), (2, 1), "{events:?}");
}
