use super::*;

fn meta(uid: &str) -> InstanceMeta {
    InstanceMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: uid.into(),
        transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
        study_instance_uid: "1.2.3".into(),
        patient_id: "P1".into(),
        source_ae: "MODALITY1".into(),
        source_ip: "127.0.0.1".into(),
        priority: Priority::Medium,
        role: Default::default(),
        amendment: false,
        arrival: Default::default(),
    }
}

fn limits(max: u64) -> Limits {
    Limits {
        max_size: max,
        min_free: 0,
    }
}

fn open(dir: &Path, max: u64) -> (Arc<Spool>, RecoveryReport) {
    Spool::open(dir, vec!["center".into()], limits(max), 1000).expect("open spool")
}

fn receive(spool: &Arc<Spool>, uid: &str, body: &[u8]) -> Result<Accepted, SpoolError> {
    let mut inc = spool.begin(b"HEADER", uid)?;
    inc.write(body)?;
    inc.commit(meta(uid), 2000)
}

/// The record of an instance that must be queued.
fn queued(a: Accepted) -> Box<InstanceRecord> {
    match a {
        Accepted::Queued { record, .. } => record,
        other => panic!("expected queued, got {other:?}"),
    }
}

#[test]
fn accepted_instances_survive_reopen_with_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean());
    let rec = queued(receive(&spool, "1.1", b"dataset-bytes").expect("receive"));
    assert_eq!(rec.dataset_offset, 6);
    assert_eq!(rec.dataset_size, 13);
    drop(spool);
    let (spool, report) = open(dir.path(), 1 << 20);
    assert_eq!(report.records, 1);
    assert!(report.is_clean(), "{report:?}");
    let rec = spool.get(rec.id).expect("record");
    assert_eq!(payload(&spool, &rec), b"HEADERdataset-bytes");
    assert_eq!(spool.payload_bytes(), 19);
    assert_eq!(spool.payload_disk_bytes(), 64 << 10, "one segment");
    let audit = spool.audit_since(0, 10).expect("audit");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].event, AuditEvent::Received);
}

#[test]
fn full_spool_refuses_and_keeps_what_it_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two payloads would fill it exactly: the index (a few KiB) tips it over.
    let (spool, _) = open(dir.path(), 256 << 10);
    receive(&spool, "1.1", &[1; (128 << 10) - 6]).expect("first fits");
    let err = receive(&spool, "1.2", &[2; (128 << 10) - 6]).expect_err("second must not fit");
    assert!(err.is_out_of_space(), "{err}");
    assert_eq!(spool.records().expect("records").len(), 1);
    assert_eq!(
        held_payloads(&spool, dir.path()),
        1,
        "the refused instance's partial file is removed"
    );
    // the reservation of the refused instance is released
    receive(&spool, "1.3", &[3; 20]).expect("small one still fits");
}

/// Plain (digests), then sealed (no digest: compared byte for byte).
fn each_kind(dir: &Path, sealed: bool) -> Arc<Spool> {
    let key = sealed.then(|| SpoolKey::new(zeroize::Zeroizing::new([5u8; 32])));
    Spool::open_with_key(dir, vec!["center".into()], limits(64 << 20), 1000, key)
        .expect("open spool")
        .0
}

#[test]
fn identical_duplicate_is_acknowledged_once_and_a_correction_supersedes() {
    for sealed in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        duplicate_then_correction(&each_kind(dir.path(), sealed), dir.path());
    }
}

fn duplicate_then_correction(spool: &Arc<Spool>, dir: &Path) {
    let first = queued(receive(spool, "1.1", b"same").expect("first"));
    assert_eq!(
        receive(spool, "1.1", b"same").expect("dup"),
        Accepted::Duplicate { existing: first.id }
    );
    let Accepted::Queued { record, superseded } =
        receive(spool, "1.1", b"corrected").expect("changed")
    else {
        panic!("a corrected version is queued")
    };
    assert_eq!(superseded, Some(first.id));
    // The stale copy is gone with its payload (its only route was superseded).
    let records = spool.records().expect("records");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, record.id);
    assert!(!dir.join(format!("data/{:016x}.dcm", first.id)).exists());
    assert_eq!(
        held_payloads(spool, dir),
        1,
        "the duplicate's file was removed"
    );
    let events = audit_events(spool);
    assert_eq!(
        events,
        vec![
            AuditEvent::Received,
            AuditEvent::Duplicate,
            AuditEvent::Superseded,
            AuditEvent::Received
        ]
    );
}

#[test]
fn concurrent_copies_of_one_instance_are_queued_once() {
    // Many associations carrying the same instance at the same moment: the
    // decision is taken inside the commit, so exactly one copy is queued.
    for round in 0..20 {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = each_kind(dir.path(), round % 2 == 1);
        let threads = 8;
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let outcomes: Vec<Accepted> = (0..threads)
            .map(|_| {
                let spool = Arc::clone(&spool);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let mut inc = spool.begin(b"HEADER", "1.7").expect("begin");
                    inc.write(&[7u8; 4096]).expect("write");
                    barrier.wait();
                    inc.commit(meta("1.7"), 2000).expect("commit")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let queued = outcomes
            .iter()
            .filter(|a| matches!(a, Accepted::Queued { .. }))
            .count();
        assert_eq!(queued, 1, "round {round}: {outcomes:?}");
        assert_eq!(spool.records().expect("records").len(), 1);
        assert_eq!(
            held_payloads(&spool, dir.path()),
            1,
            "round {round}: only the queued copy's payload stays"
        );
    }
}

#[test]
fn sealed_copies_are_told_apart_by_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = each_kind(dir.path(), true);
    // Large enough for a file of its own, and for many chunks of the seal.
    let mut body = vec![0u8; 700 << 10];
    for (i, b) in body.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let first = queued(receive(&spool, "1.1", &body).expect("first"));
    assert!(first.segment.is_none(), "in a file of its own");
    assert!(!has_digest(&first.sha256), "a sealed payload is not hashed");
    assert_eq!(
        receive(&spool, "1.1", &body).expect("again"),
        Accepted::Duplicate { existing: first.id }
    );
    // The same size, one byte changed in the last chunk: a correction.
    let mut changed = body.clone();
    *changed.last_mut().expect("byte") ^= 1;
    let second = queued(receive(&spool, "1.1", &changed).expect("corrected"));
    assert_ne!(
        second.sha256, first.sha256,
        "records without digest never match"
    );
    // Small ones in a segment, across a restart (the log is replayed; the
    // comparison reads the first copy back from its segment).
    let small = queued(receive(&spool, "1.2", b"segment-bytes").expect("small"));
    assert!(small.segment.is_some());
    drop(spool);
    let spool = each_kind(dir.path(), true);
    assert_eq!(
        receive(&spool, "1.2", b"segment-bytes").expect("again"),
        Accepted::Duplicate { existing: small.id }
    );
    assert!(matches!(
        receive(&spool, "1.2", b"segment-bytez").expect("corrected"),
        Accepted::Queued { superseded: Some(id), .. } if id == small.id
    ));
    assert_eq!(
        audit_events(&spool),
        vec![
            AuditEvent::Received,
            AuditEvent::Duplicate,
            AuditEvent::Superseded,
            AuditEvent::Received,
            AuditEvent::Received,
            AuditEvent::Duplicate,
            AuditEvent::Superseded,
            AuditEvent::Received,
        ]
    );
}

#[test]
fn a_sealed_copy_that_cannot_be_read_is_replaced_by_its_resend() {
    // The spooled copy was damaged on disk: the same bytes sent again are
    // queued in its place (the damaged one would only be dead-lettered).
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = each_kind(dir.path(), true);
    let body = vec![7u8; 700 << 10];
    let first = queued(receive(&spool, "1.1", &body).expect("first"));
    let path = dir.path().join(format!("data/{:016x}.dcm", first.id));
    let mut bytes = fs::read(&path).expect("payload");
    let at = bytes.len() - 100;
    bytes[at] ^= 1;
    fs::write(&path, bytes).expect("damage");
    let again = receive(&spool, "1.1", &body).expect("again");
    assert!(
        matches!(again, Accepted::Queued { superseded: Some(id), .. } if id == first.id),
        "{again:?}"
    );
}

#[test]
fn a_correction_replaces_only_what_was_not_delivered() {
    // Two destinations; the old copy already reached one of them.
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) =
        Spool::open(dir.path(), vec!["a".into(), "b".into()], limits(1 << 20), 1).expect("open");
    let old = queued(receive(&spool, "1.1", b"stale").expect("old"));
    let how = RouteUpdate {
        durability: Durability::Immediate,
        audit: None,
        now_ms: 2,
        keep_payload: false,
    };
    spool
        .update_route(old.id, "a", how, |r| r.state = RouteState::Delivered)
        .expect("deliver to a");
    let new = queued(receive(&spool, "1.1", b"fresh").expect("correction"));
    assert!(
        matches!(spool.get(old.id), Err(SpoolError::NotFound(_))),
        "the stale copy is gone: it can never be sent after the correction"
    );
    let counts = spool.counts().expect("counts");
    assert_eq!((counts["a"].queued, counts["b"].queued), (1, 1));
    assert_eq!(spool.get(new.id).expect("new").routes.len(), 2);
    let superseded: Vec<_> = spool
        .audit_since(0, 100)
        .expect("audit")
        .into_iter()
        .filter(|a| a.event == AuditEvent::Superseded)
        .collect();
    assert_eq!(superseded.len(), 1, "one pending route was dropped");
    assert_eq!(superseded[0].destination.as_deref(), Some("b"));
}

#[test]
fn recovery_repairs_mismatches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    // Larger than half a segment: in files of their own.
    let a = queued(receive(&spool, "1.1", &[b'a'; 40 << 10]).expect("a"));
    let b = queued(receive(&spool, "1.2", &[b'b'; 40 << 10]).expect("b"));
    // a crash mid-receive (a payload without a record), a lost payload:
    fs::write(dir.path().join("data/00000000000000ff.dcm"), b"partial").expect("orphan");
    fs::remove_file(dir.path().join(format!("data/{:016x}.dcm", b.id))).expect("lose b");
    drop(spool);

    let (spool, report) = open(dir.path(), 1 << 20);
    assert_eq!(report.orphan_files_removed, 1);
    assert_eq!(report.missing_payloads, vec![b.id]);
    assert_eq!(
        spool.get(a.id).expect("a").routes[0].state,
        RouteState::Queued
    );
    let b = spool.get(b.id).expect("b kept as dead letter, not dropped");
    assert_eq!(b.routes[0].state, RouteState::DeadLetter);
    assert!(b.routes[0]
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("integrity"));
    // new ids never collide with the orphan's
    let c = queued(receive(&spool, "1.3", b"c").expect("c"));
    assert!(c.id > 0xff);
}

#[test]
fn delivery_deletes_payload_and_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let a = queued(receive(&spool, "1.1", b"aaaa").expect("a"));
    spool
        .update_route(
            a.id,
            "center",
            RouteUpdate {
                durability: Durability::Immediate,
                audit: Some((AuditEvent::Delivered, "ok".into())),
                now_ms: 5000,
                keep_payload: false,
            },
            |r| {
                r.state = RouteState::Delivered;
                r.delivered_ms = Some(5000);
            },
        )
        .expect("deliver");
    assert!(spool.records().expect("records").is_empty());
    assert_eq!(spool.payload_bytes(), 0);
    assert_eq!(held_payloads(&spool, dir.path()), 0);
    // after delivery the same instance may be sent again (a deliberate re-send)
    assert!(matches!(
        receive(&spool, "1.1", b"aaaa").expect("resend"),
        Accepted::Queued { .. }
    ));
}

#[test]
fn dead_letters_can_be_retried_or_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let a = queued(receive(&spool, "1.1", b"aaaa").expect("a"));
    let b = queued(receive(&spool, "1.2", b"bbbb").expect("b"));
    for id in [a.id, b.id] {
        spool
            .update_route(
                id,
                "center",
                RouteUpdate {
                    durability: Durability::Immediate,
                    audit: None,
                    now_ms: 1,
                    keep_payload: false,
                },
                |r| {
                    r.state = RouteState::DeadLetter;
                    r.last_error = Some("0xA900 dataset does not match SOP class".into());
                },
            )
            .expect("dead");
    }
    assert_eq!(
        spool.retry_dead(None, &[a.id], 2).expect("retry"),
        vec![a.id]
    );
    assert_eq!(
        spool.get(a.id).expect("a").routes[0].state,
        RouteState::Queued
    );
    assert_eq!(
        spool.purge_dead(Some("center"), &[], 3).expect("purge"),
        vec![b.id]
    );
    assert!(matches!(spool.get(b.id), Err(SpoolError::NotFound(_))));
    assert!(!dir.path().join(format!("data/{:016x}.dcm", b.id)).exists());
    let events = audit_events(&spool);
    assert!(events.contains(&AuditEvent::Retried) && events.contains(&AuditEvent::Purged));
}

#[test]
fn refuses_a_newer_record_format() {
    assert!(matches!(
        record::decode::<AuditRecord>(&[9, b'{', b'}']),
        Err(DecodeError::TooNew(9))
    ));
}

/// Marks `id` delivered to "center" in a non-durable commit.
fn deliver_without_flush(spool: &Spool, id: u64) {
    spool
        .update_route(
            id,
            "center",
            RouteUpdate {
                durability: Durability::None,
                audit: None,
                now_ms: 5000,
                keep_payload: false,
            },
            |r| r.state = RouteState::Delivered,
        )
        .expect("deliver");
}

#[test]
fn a_non_durable_delivery_keeps_its_payload_until_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let a = queued(receive(&spool, "1.1", b"aaaa").expect("a"));
    deliver_without_flush(&spool, a.id);
    assert!(
        spool.records().expect("records").is_empty(),
        "readers see the delivery at once"
    );
    assert_eq!(
        held_payloads(&spool, dir.path()),
        1,
        "but the payload outlives it until the delivery is durable"
    );
    spool.checkpoint().expect("checkpoint");
    assert_eq!(held_payloads(&spool, dir.path()), 0);
    assert_eq!(spool.payload_bytes(), 0);
}

#[test]
fn recovery_finishes_a_rename_of_a_spool_written_by_0_1_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let body = [b'a'; 40 << 10];
    let a = queued(receive(&spool, "1.1", &body).expect("a"));
    drop(spool);
    // A spool written by 0.1.0, as if the box died after the index commit
    // but before the rename from tmp/ was durable.
    let name = format!("{:016x}", a.id);
    fs::create_dir(dir.path().join("tmp")).expect("old tmp dir");
    fs::rename(
        dir.path().join(format!("data/{name}.dcm")),
        dir.path().join(format!("tmp/{name}.part")),
    )
    .expect("undo rename");
    // and a partial reception next to it, which must go
    fs::write(dir.path().join("tmp/00000000000000aa.part"), b"half").expect("partial");

    let (spool, report) = open(dir.path(), 1 << 20);
    assert_eq!(report.renames_completed, 1);
    assert_eq!(report.temp_files_removed, 1);
    assert!(report.missing_payloads.is_empty(), "{report:?}");
    let rec = spool.get(a.id).expect("record");
    assert_eq!(rec.routes[0].state, RouteState::Queued);
    assert_eq!(payload(&spool, &rec), [&b"HEADER"[..], &body].concat());
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0
    );
}

#[test]
fn retention_keeps_delivered_payloads_until_swept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let a = queued(receive(&spool, "1.1", b"aaaa").expect("a"));
    let how = RouteUpdate {
        durability: Durability::Immediate,
        audit: None,
        now_ms: 5000,
        keep_payload: true,
    };
    spool
        .update_route(a.id, "center", how, |r| {
            r.state = RouteState::Delivered;
            r.delivered_ms = Some(5000);
        })
        .expect("deliver");
    assert_eq!(
        held_payloads(&spool, dir.path()),
        1,
        "retained after delivery"
    );
    assert_eq!(spool.counts().expect("counts")["center"].queued, 0);
    assert_eq!(
        spool.sweep_retained(5000).expect("sweep"),
        0,
        "not yet past retention"
    );
    assert_eq!(spool.sweep_retained(5001).expect("sweep"), 1);
    assert_eq!(held_payloads(&spool, dir.path()), 0);
    assert!(spool.records().expect("records").is_empty());
}

#[test]
fn a_payload_stays_until_every_destination_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) =
        Spool::open(dir.path(), vec!["a".into(), "b".into()], limits(1 << 20), 1).expect("open");
    let rec = queued(receive(&spool, "1.1", b"data").expect("rec"));
    let deliver = |d: &str| {
        let how = RouteUpdate {
            durability: Durability::Immediate,
            audit: None,
            now_ms: 2,
            keep_payload: false,
        };
        spool
            .update_route(rec.id, d, how, |r| r.state = RouteState::Delivered)
            .expect("deliver")
    };
    deliver("a");
    assert_eq!(held_payloads(&spool, dir.path()), 1, "b still needs it");
    assert_eq!(spool.counts().expect("counts")["b"].queued, 1);
    deliver("b");
    assert_eq!(held_payloads(&spool, dir.path()), 0);
}

#[test]
fn a_keyed_spool_seals_payloads_and_patient_ids_and_catches_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SpoolKey::new(zeroize::Zeroizing::new([9u8; 32]));
    let (spool, _) = open_keyed(dir.path(), key.clone()).expect("open");
    let body = b"PATIENT^NAME dataset bytes".repeat(5000);
    let rec = queued(receive(&spool, "1.1", &body).expect("receive"));
    assert!(seal::is_sealed(&payload(&spool, &rec)[..4]));
    // Nowhere on disk: not in the payload, not in the log entry.
    for f in fs::read_dir(dir.path().join("seg")).expect("seg") {
        let on_disk = fs::read(f.expect("entry").path()).expect("read");
        assert!(
            !on_disk.windows(12).any(|w| w == b"PATIENT^NAME"),
            "plaintext on disk"
        );
    }
    let index = fs::read(dir.path().join("index.redb")).expect("index");
    assert!(
        !index.windows(2).any(|w| w == b"P1"),
        "Patient ID in the index"
    );
    assert_eq!(spool.patient_id(&rec).as_deref(), Some("P1"));
    let dataset = DatasetRef::from(&*rec);
    assert_eq!(spool.read_dataset(&dataset).expect("reads"), body);

    // One flipped byte anywhere: the check fails, naming integrity.
    let on_disk = payload(&spool, &rec);
    let mut bad = on_disk.clone();
    bad[on_disk.len() / 2] ^= 0x20;
    set_payload(&spool, &rec, &bad);
    let e = spool
        .verify_dataset(&dataset)
        .expect_err("tampered")
        .to_string();
    assert!(e.contains("authentication"), "{e}");

    // Reopened with its key after a crash: recovery finds the payload whole.
    set_payload(&spool, &rec, &on_disk);
    drop(spool);
    let (spool, report) = open_keyed(dir.path(), key).expect("reopen");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(spool.payload_bytes(), on_disk.len() as u64);
    assert_eq!(spool.read_dataset(&dataset).expect("reads"), body);

    // Reopened without the key: the payload and the Patient ID stay sealed.
    drop(spool);
    let (spool, _) = open(dir.path(), 1 << 20);
    assert_eq!(spool.patient_id(&rec), None);
    assert!(spool.read_dataset(&dataset).is_err());
}

/// The checked reader gives every byte of an intact dataset and withholds
/// the last bytes of one that fails its check, so a consumer that sends
/// what it reads (the forwarder streaming a large dataset) never sends the
/// whole of a damaged one. Clear and sealed, in a segment and in a file of
/// its own; one byte flipped in the middle or at the very end of the
/// payload, or the payload cut short.
#[test]
fn a_checked_reader_withholds_the_end_of_a_dataset_that_fails_its_check() {
    fn read_all(spool: &Spool, dataset: &DatasetRef) -> (Vec<u8>, Option<std::io::Error>) {
        // A payload of one chunk fails when it is opened: nothing is given.
        let mut r = match spool.checked_reader(dataset) {
            Ok(r) => r,
            Err(e @ SpoolError::Integrity { .. }) => {
                let e = std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
                return (Vec::new(), Some(e));
            }
            Err(e) => panic!("{e}"),
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e)),
            }
        }
    }
    for sealed in [false, true] {
        for size in [20usize << 10, 300 << 10] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (spool, _) = if sealed {
                open_keyed(
                    dir.path(),
                    SpoolKey::new(zeroize::Zeroizing::new([5u8; 32])),
                )
                .expect("open")
            } else {
                open(dir.path(), 1 << 20)
            };
            let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let rec = queued(receive(&spool, "1.5", &body).expect("receive"));
            let own_file = rec.segment.is_none();
            assert_eq!(own_file, size > (32 << 10), "where it is stored");
            let dataset = DatasetRef::from(&*rec);
            let case = format!("sealed {sealed}, {size} bytes");
            let (got, err) = read_all(&spool, &dataset);
            assert!(err.is_none() && got == body, "{case}: intact, {err:?}");

            let on_disk = payload(&spool, &rec);
            for at in [on_disk.len() / 2, on_disk.len() - 1] {
                let mut bad = on_disk.clone();
                bad[at] ^= 0x01;
                set_payload(&spool, &rec, &bad);
                let (got, err) = read_all(&spool, &dataset);
                let e = err.unwrap_or_else(|| panic!("{case}, byte {at} flipped: read whole"));
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{case}: {e}");
                assert!(
                    got.len() < body.len(),
                    "{case}, byte {at} flipped: its last bytes were given"
                );
            }
            set_payload(&spool, &rec, &on_disk);
            if own_file {
                let (path, _, len) = spool.payload_location(&rec);
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open")
                    .set_len(len - 1000)
                    .expect("cut");
                let (got, err) = read_all(&spool, &dataset);
                let e = err.unwrap_or_else(|| panic!("{case}, cut short: read whole"));
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{case}: {e}");
                assert!(got.len() < body.len(), "{case}");
                set_payload(&spool, &rec, &on_disk);
            }
            assert_eq!(read_all(&spool, &dataset).0, body, "{case}: restored");
        }
    }
}

#[test]
fn a_sealed_payload_cut_at_a_chunk_boundary_fails_its_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SpoolKey::new(zeroize::Zeroizing::new([3u8; 32]));
    let (spool, _) = open_keyed(dir.path(), key).expect("open");
    // "HEADER" + body fills exactly two 64 KiB chunks; the file ends with
    // an empty, flagged last chunk (its tag alone).
    let body = vec![0x5a; 2 * 65536 - 6];
    let rec = queued(receive(&spool, "1.9", &body).expect("receive"));
    let dataset = DatasetRef::from(&*rec);
    spool.verify_dataset(&dataset).expect("whole file verifies");
    // The last chunk (its tag alone) gone: zeros where it was.
    let (path, at, len) = spool.payload_location(&rec);
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open"),
        &[0u8; 16],
        at + len - 16,
    )
    .expect("cut the last chunk");
    let e = spool
        .verify_dataset(&dataset)
        .expect_err("cut file")
        .to_string();
    assert!(
        e.contains("truncated") || e.contains("authentication"),
        "{e}"
    );
}

#[test]
fn an_unreadable_payload_is_an_io_error_not_integrity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    // Larger than half a segment: in a file of its own.
    let body = vec![b'a'; 200 << 10];
    let rec = queued(receive(&spool, "1.1", &body).expect("a"));
    assert_eq!(rec.segment, None);
    let dataset = DatasetRef::from(&*rec);
    let (path, _, _) = spool.payload_location(&rec);
    let aside = dir.path().join("aside");
    fs::rename(&path, &aside).expect("move aside");
    // A directory where the file was: opening works, reading fails (EISDIR),
    // as a failing disk would (EIO): nothing says the bytes are wrong.
    fs::create_dir(&path).expect("dir in its place");
    let e = spool.read_dataset(&dataset).expect_err("unreadable");
    assert!(matches!(e, SpoolError::Io { .. }), "{e:?}");
    fs::remove_dir(&path).expect("rmdir");
    let e = spool.read_dataset(&dataset).expect_err("missing");
    assert!(matches!(e, SpoolError::Integrity { .. }), "{e:?}");
    let mut other = b"HEADER".to_vec();
    other.extend_from_slice(&body);
    *other.last_mut().expect("bytes") = b'b';
    fs::write(&path, &other).expect("other bytes");
    let e = spool.read_dataset(&dataset).expect_err("changed");
    assert!(matches!(e, SpoolError::Integrity { .. }), "{e:?}");
    fs::rename(&aside, &path).expect("restore");
    assert_eq!(spool.read_dataset(&dataset).expect("reads"), body);
}

/// A spool of 1 MiB for the destination "center", sealed with `key`.
fn open_keyed(dir: &Path, key: SpoolKey) -> Result<(Arc<Spool>, RecoveryReport), SpoolError> {
    Spool::open_with_key(dir, vec!["center".into()], limits(1 << 20), 1000, Some(key))
}

/// The events of the audit trail, oldest first.
fn audit_events(spool: &Spool) -> Vec<AuditEvent> {
    spool
        .audit_since(0, 100)
        .expect("audit")
        .into_iter()
        .map(|a| a.event)
        .collect()
}

/// Payloads the spool holds: files of their own and frames in segments.
fn held_payloads(spool: &Spool, dir: &Path) -> usize {
    let files = fs::read_dir(dir.join("data")).expect("data").count();
    files + spool.segments.live() as usize
}

/// Overwrites the payload of `rec` where it is stored.
fn set_payload(spool: &Spool, rec: &InstanceRecord, bytes: &[u8]) {
    let (path, at, len) = spool.payload_location(rec);
    assert_eq!(bytes.len() as u64, len);
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new().write(true).open(path).expect("open"),
        bytes,
        at,
    )
    .expect("write payload");
}

/// The payload of `rec` as stored (in its segment or its file).
fn payload(spool: &Spool, rec: &InstanceRecord) -> Vec<u8> {
    let (path, at, len) = spool.payload_location(rec);
    let mut out = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&File::open(path).expect("open"), &mut out, at)
        .expect("read payload");
    out
}

#[test]
fn instances_sealed_with_a_lost_key_are_dead_lettered_as_key_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open_with = |k: u8| {
        Spool::open_with_key(
            dir.path(),
            vec!["center".into()],
            limits(1 << 20),
            1000,
            Some(SpoolKey::new(zeroize::Zeroizing::new([k; 32]))),
        )
        .expect("open")
    };
    let (spool, _) = open_with(1);
    let a = queued(receive(&spool, "1.1", b"aaaa").expect("a"));
    drop(spool);
    // Same key again: nothing happens.
    let (spool, report) = open_with(1);
    assert!(report.is_clean(), "{report:?}");
    drop(spool);
    // The TPM was reset and the box provisioned again: a new spool key.
    let (spool, report) = open_with(2);
    assert_eq!(report.key_lost, vec![a.id]);
    let rec = spool.get(a.id).expect("kept, not deleted");
    assert_eq!(rec.routes[0].state, RouteState::DeadLetter);
    let why = rec.routes[0].last_error.clone().unwrap_or_default();
    assert!(
        why.starts_with("key lost:") && !why.contains("integrity"),
        "{why}"
    );
    let e = spool
        .read_dataset(&DatasetRef::from(&rec))
        .expect_err("unreadable");
    assert!(matches!(e, SpoolError::KeyLost { .. }), "{e:?}");
    // New instances are sealed with the new key and flow as usual.
    let b = queued(receive(&spool, "1.2", b"bbbb").expect("b"));
    assert_eq!(
        spool.read_dataset(&DatasetRef::from(&*b)).expect("reads"),
        b"bbbb"
    );
    let dead: Vec<_> = spool
        .audit_since(0, 100)
        .expect("audit")
        .into_iter()
        .filter(|x| x.event == AuditEvent::DeadLettered)
        .collect();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].detail.starts_with("key lost"));
}

#[test]
fn the_audit_is_pruned_by_age_and_count_after_an_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let export = dir.path().join("audit");
    let (spool, _) = open(dir.path(), 1 << 20);
    for t in 0..100u64 {
        spool
            .audit(AuditRecord::new(
                t * 1000,
                AuditEvent::AssociationAccepted,
                "MOD@127.0.0.1",
                format!("record {t}"),
            ))
            .expect("audit");
    }
    // By age: everything before t = 30 s.
    assert_eq!(
        spool
            .prune_audit(30_000, 1000, &export, 1000)
            .expect("prune"),
        30
    );
    let left = spool.audit_since(0, 1000).expect("audit");
    assert_eq!(left.len(), 70);
    assert_eq!(left[0].seq, 31);
    // By count: at most 50 kept, in batches of 15.
    assert_eq!(spool.prune_audit(0, 50, &export, 15).expect("prune"), 15);
    assert_eq!(spool.prune_audit(0, 50, &export, 15).expect("prune"), 5);
    assert_eq!(spool.prune_audit(0, 50, &export, 15).expect("prune"), 0);
    assert_eq!(spool.audit_since(0, 1000).expect("audit").len(), 50);
    // Everything pruned is in the export files, once, in order.
    let mut files: Vec<_> = fs::read_dir(&export)
        .expect("export dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let exported: Vec<AuditRecord> = files
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .expect("read")
                .lines()
                .map(|l| serde_json::from_str(l).expect("a record per line"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        exported.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    // Even when everything is old, the newest record stays: seqs go on.
    assert_eq!(
        spool
            .prune_audit(u64::MAX, 1000, &export, 1000)
            .expect("prune"),
        49
    );
    spool
        .audit(AuditRecord::new(1, AuditEvent::Purged, "operator", ""))
        .expect("audit");
    let left = spool.audit_since(0, 10).expect("audit");
    assert_eq!(
        left.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![100, 101]
    );
}

#[test]
fn dead_letter_counters_match_a_full_scan_through_every_kind_of_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dests = vec!["a".to_string(), "b".to_string()];
    let (spool, _) = Spool::open(dir.path(), dests.clone(), limits(64 << 20), 1).expect("open");
    let mut rng = fastrand::Rng::with_seed(3);
    let mut ids = Vec::new();
    let check = |spool: &Spool| {
        let full = spool.counts().expect("counts");
        for d in &dests {
            assert_eq!(spool.dead_letters(d), full[d].dead_letter, "{d}");
        }
    };
    for step in 0..300u32 {
        match rng.u8(0..7) {
            0 | 1 => {
                let uid = format!("1.{}", rng.u32(0..40));
                let body = vec![rng.u8(..); 16];
                if let Ok(Accepted::Queued { record, .. }) = receive(&spool, &uid, &body) {
                    ids.push(record.id);
                }
            }
            2 | 3 if !ids.is_empty() => {
                let id = ids[rng.usize(0..ids.len())];
                let d = &dests[rng.usize(0..2)];
                let state = [
                    RouteState::DeadLetter,
                    RouteState::Delivered,
                    RouteState::Queued,
                ][rng.usize(0..3)];
                let how = RouteUpdate {
                    durability: Durability::Immediate,
                    audit: None,
                    now_ms: 5,
                    keep_payload: false,
                };
                let _ = spool.update_route(id, d, how, |r| r.state = state);
            }
            4 => {
                let _ = spool.retry_dead(None, &[], 6);
            }
            5 => {
                let _ = spool.purge_dead(Some(&dests[rng.usize(0..2)]), &[], 7);
            }
            _ => {
                let _ = spool.dead_letter_queued(None, &[], false, 8);
            }
        }
        if step % 10 == 0 {
            check(&spool);
        }
    }
    check(&spool);
    drop(spool);
    let (spool, _) = Spool::open(dir.path(), dests.clone(), limits(64 << 20), 9).expect("reopen");
    check(&spool);
}

fn result_meta(uid: &str, study: &str, accession: Option<&str>) -> InstanceMeta {
    InstanceMeta {
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.104.1".into(),
        study_instance_uid: study.into(),
        source_ae: "READCENTER".into(),
        role: Role::Result,
        arrival: Arrival {
            accession_number: accession.map(str::to_string),
            ..Default::default()
        },
        ..meta(uid)
    }
}

fn open_with_pacs(dir: &Path) -> Arc<Spool> {
    let routing = Routing {
        current: vec!["center".into()],
        results: vec!["pacs".into()],
        prefetch: true,
        urgent: true,
        report_notices: false,
    };
    Spool::open(dir, routing, limits(1 << 20), 1000)
        .expect("open spool")
        .0
}

#[test]
fn results_go_to_the_pacs_only_when_they_match_a_relayed_study() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = open_with_pacs(dir.path());
    // A hospital study (Study UID 1.2.3) with an Accession Number.
    let mut inc = spool.begin(b"H", "1.1").expect("begin");
    inc.write(b"image").expect("write");
    let mut m = meta("1.1");
    m.arrival.accession_number = Some("ACC-7".into());
    let study = queued(inc.commit(m, 2000).expect("commit"));
    assert_eq!(study.routes.len(), 1);
    assert_eq!(study.routes[0].destination, "center");
    let entry = spool.study("1.2.3").expect("read").expect("study noted");
    assert_eq!((entry.instances, entry.bytes), (1, 5));
    assert_eq!(entry.accessions.len(), 1);
    assert_ne!(
        entry.accessions[0], "ACC-7",
        "the accession is not kept in clear"
    );

    let result = |uid: &str, study: &str, acc: Option<&str>| {
        let mut inc = spool.begin(b"H", uid).expect("begin");
        inc.write(b"report").expect("write");
        queued(
            inc.commit(result_meta(uid, study, acc), 3000)
                .expect("commit"),
        )
    };
    // Same study: queued for the PACS, not for the center.
    let by_uid = result("9.1", "1.2.3", None);
    assert_eq!(by_uid.routes.len(), 1);
    assert_eq!(by_uid.routes[0].destination, "pacs");
    assert_eq!(by_uid.routes[0].state, RouteState::Queued);
    // Another Study UID but the same Accession Number: matched too.
    let by_accession = result("9.2", "7.7.7", Some("ACC-7"));
    assert_eq!(by_accession.routes[0].state, RouteState::Queued);
    // Nothing known: held, with the reason, and audited.
    let unknown = result("9.3", "8.8.8", Some("ACC-8"));
    assert_eq!(unknown.routes[0].state, RouteState::Held);
    let why = unknown.routes[0].last_error.clone().expect("reason");
    assert!(why.contains("8.8.8"), "{why}");
    let counts = spool.counts().expect("counts");
    assert_eq!(counts["pacs"].queued, 2);
    assert_eq!(counts["pacs"].held, 1);
    assert_eq!(counts["center"].queued, 1);
    assert_eq!(
        spool.held("pacs"),
        1,
        "the O(1) counter agrees with the scan"
    );
    assert!(spool
        .audit_since(0, 100)
        .expect("audit")
        .iter()
        .any(|a| a.event == AuditEvent::Held && a.sop_instance_uid.as_deref() == Some("9.3")));

    // Held survives a restart (and recovery adds no route of another role).
    drop(spool);
    let spool = open_with_pacs(dir.path());
    assert_eq!(spool.held("pacs"), 1, "counted again by recovery");
    let again = spool.get(unknown.id).expect("record");
    assert_eq!(again.routes.len(), 1);
    assert_eq!(again.routes[0].state, RouteState::Held);
    // The operator releases it: queued for the PACS.
    assert_eq!(
        spool.release_held(&[], 4000).expect("release"),
        vec![unknown.id]
    );
    assert_eq!(
        spool.get(unknown.id).expect("record").routes[0].state,
        RouteState::Queued
    );
    assert_eq!(spool.held("pacs"), 0);
}

#[test]
fn a_held_result_can_be_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = open_with_pacs(dir.path());
    let mut inc = spool.begin(b"H", "9.9").expect("begin");
    inc.write(b"report").expect("write");
    let rec = queued(
        inc.commit(result_meta("9.9", "5.5", None), 3000)
            .expect("commit"),
    );
    assert_eq!(rec.routes[0].state, RouteState::Held);
    assert_eq!(
        spool.purge_held(&[rec.id], 4000).expect("purge"),
        vec![rec.id]
    );
    assert!(matches!(spool.get(rec.id), Err(SpoolError::NotFound(_))));
    assert_eq!(spool.payload_bytes(), 0);
}

#[test]
fn a_new_study_is_prefetched_once_and_its_priors_never_start_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = open_with_pacs(dir.path());
    let receive_as = |uid: &str, study: &str, role: Role, at: u64| {
        let mut inc = spool.begin(b"H", uid).expect("begin");
        inc.write(b"image").expect("write");
        let m = InstanceMeta {
            study_instance_uid: study.into(),
            role,
            ..meta(uid)
        };
        queued(inc.commit(m, at).expect("commit"))
    };
    receive_as("1.1", "1.2.3", Role::Current, 2000);
    receive_as("1.2", "1.2.3", Role::Current, 5000);
    // Not stable until `stable_after` has passed since the last instance.
    assert!(spool.prefetch_due(6000, 2000).expect("due").is_empty());
    let due = spool.prefetch_due(7000, 2000).expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].0, "1.2.3");
    assert_eq!(due[0].1.instances, 2);
    let patient = due[0]
        .1
        .patient
        .clone()
        .expect("patient kept for the query");
    assert_eq!(
        spool.open_study_value("1.2.3", &patient).as_deref(),
        Some("P1")
    );

    // The box chose two priors: both noted as priors in the same step.
    let chosen = Prefetch {
        state: PrefetchState::Retrieving,
        attempts: 1,
        next_attempt_ms: 60_000,
        priors: vec!["7.1".into(), "7.2".into()],
        retrieved: Vec::new(),
        detail: None,
    };
    spool
        .set_prefetch(
            "1.2.3",
            chosen,
            &["7.1".into(), "7.2".into()],
            "chose 2",
            7000,
        )
        .expect("set");
    assert!(
        spool.prefetch_due(8000, 2000).expect("due").is_empty(),
        "a retrieval in progress waits for its next attempt"
    );
    assert_eq!(spool.prefetch_due(60_000, 2000).expect("due").len(), 1);
    let prior = spool.study("7.1").expect("read").expect("prior noted");
    assert_eq!(prior.role, Role::Prior);
    assert!(prior.prefetch.is_none());

    // Instances of a prior arrive: they go to the center on the low lane
    // and never start a prefetch of their own.
    let p = receive_as("7.1.1", "7.1", Role::Prior, 61_000);
    assert_eq!(p.routes[0].destination, "center");
    let done = Prefetch {
        state: PrefetchState::Done,
        attempts: 1,
        next_attempt_ms: 0,
        priors: vec!["7.1".into(), "7.2".into()],
        retrieved: Vec::new(),
        detail: Some("2 studies, 1 instance".into()),
    };
    spool
        .set_prefetch("1.2.3", done, &[], "done", 62_000)
        .expect("set");
    // The hospital sends the study again: counted, not prefetched again.
    receive_as("1.3", "1.2.3", Role::Current, 63_000);
    drop(spool);
    let spool = open_with_pacs(dir.path());
    assert!(spool
        .prefetch_due(u64::MAX / 2, 2000)
        .expect("due")
        .is_empty());
    let studies = spool.studies().expect("studies");
    assert_eq!(studies.len(), 3);
    let current = spool.study("1.2.3").expect("read").expect("study");
    assert_eq!(current.instances, 3);
    assert_eq!(
        current.prefetch.expect("prefetch").state,
        PrefetchState::Done
    );
    assert_eq!(
        spool.study("7.1").expect("read").expect("prior").instances,
        1
    );
    let prefetches = spool
        .audit_since(0, 100)
        .expect("audit")
        .into_iter()
        .filter(|a| a.event == AuditEvent::Prefetch)
        .count();
    assert_eq!(prefetches, 2);
    assert!(matches!(
        spool.set_prefetch(
            "9.9.9",
            Prefetch {
                state: PrefetchState::Done,
                attempts: 0,
                next_attempt_ms: 0,
                priors: vec![],
                retrieved: Vec::new(),
                detail: None
            },
            &[],
            "x",
            1
        ),
        Err(SpoolError::NoStudy(_))
    ));
}

#[test]
fn urgent_findings_keep_their_own_numbers_and_wait_while_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = open_with_pacs(dir.path());
    let mut inc = spool.begin(b"H", "1.1").expect("begin");
    inc.write(b"image").expect("write");
    queued(inc.commit(meta("1.1"), 1000).expect("commit"));
    let urgent_result = |spool: &Arc<Spool>, uid: &str, study: &str| {
        let mut inc = spool.begin(b"H", uid).expect("begin");
        inc.write(b"report").expect("write");
        let m = InstanceMeta {
            priority: Priority::High,
            arrival: Arrival {
                report: Some(ReportFacts {
                    title: Some("Radiology Report".into()),
                    text: Some("Tension pneumothorax".into()),
                    made: None,
                    physician: Some("Sato^Hanako".into()),
                    codes: Vec::new(),
                }),
                urgent: Some("C-STORE priority HIGH".into()),
                ..Default::default()
            },
            ..result_meta(uid, study, None)
        };
        queued(inc.commit(m, 2000).expect("commit"))
    };
    let first = urgent_result(&spool, "9.1", "1.2.3");
    let listed = spool.urgent().expect("urgent");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id, listed[0].result_id), (1, first.id));
    let details = spool.urgent_details(&listed[0]).expect("opens");
    assert_eq!(details.patient_id, "P1");
    assert_eq!(details.facts.text.as_deref(), Some("Tension pneumothorax"));
    assert_eq!(spool.urgent_due(2000).expect("due").len(), 1);
    spool
        .update_urgent(1, "operator", 3000, |e| {
            e.state = UrgentState::Acknowledged;
            Ok("acknowledged".into())
        })
        .expect("ack");
    assert!(spool.urgent_due(u64::MAX).expect("due").is_empty());
    assert!(matches!(
        spool.update_urgent(7, "operator", 3000, |_| Ok(String::new())),
        Err(SpoolError::NotFound(7))
    ));

    // Everything delivered: the spool empties, and spool ids start again.
    for id in [1, first.id] {
        for dest in ["center", "pacs"] {
            let _ = spool.update_route(
                id,
                dest,
                RouteUpdate {
                    durability: Durability::Immediate,
                    audit: None,
                    now_ms: 4000,
                    keep_payload: false,
                },
                |r| r.state = RouteState::Delivered,
            );
        }
    }
    assert!(spool.records().expect("records").is_empty());
    drop(spool);
    let spool = open_with_pacs(dir.path());
    // An image, then a held urgent result (no such study): not due until
    // released. Its spool id is the first urgent result's again.
    let mut inc = spool.begin(b"H", "1.5").expect("begin");
    inc.write(b"image").expect("write");
    queued(inc.commit(meta("1.5"), 4500).expect("commit"));
    let second = urgent_result(&spool, "9.2", "8.8.8");
    assert_eq!(second.id, first.id, "spool ids start again from 1");
    let listed = spool.urgent().expect("urgent");
    assert_eq!(
        listed.len(),
        2,
        "the first finding's record was overwritten"
    );
    assert_eq!(listed[0].state, UrgentState::Acknowledged);
    assert_eq!((listed[1].id, listed[1].held), (2, true));
    assert!(spool.urgent_due(u64::MAX).expect("due").is_empty());
    spool.release_held(&[second.id], 5000).expect("release");
    let due = spool.urgent_due(5000).expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].id, 2);
    let open: Vec<u64> = spool
        .urgent_open()
        .expect("open")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        open,
        vec![2],
        "an acknowledged entry is out of the open index"
    );

    // A spool from before the open index: it is built once, at open.
    spool
        .with_db(|db| {
            let txn = db.begin_write().map_err(idx("begin"))?;
            txn.delete_table(URGENT_OPEN).map_err(idx("delete"))?;
            txn.open_table(META)
                .map_err(idx("meta"))?
                .remove("urgent_open")
                .map_err(idx("meta"))?;
            txn.commit().map_err(idx("commit"))
        })
        .expect("make it old");
    assert!(spool.urgent_open().expect("open").is_empty());
    drop(spool);
    let spool = open_with_pacs(dir.path());
    let open: Vec<u64> = spool
        .urgent_open()
        .expect("open")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(open, vec![2], "rebuilt from the urgent table");
}

#[test]
fn instances_whose_index_update_the_power_cut_are_accepted_again_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SpoolKey::new(zeroize::Zeroizing::new([3u8; 32]));
    let open_keyed = || open_keyed(dir.path(), key.clone()).expect("open");
    let (spool, _) = open_keyed();
    let stale = queued(receive(&spool, "1.1", b"first version").expect("v1"));
    let mut m = meta("1.2");
    m.arrival.accession_number = Some("ACC7".into());
    // The frames reach the disk, the index updates do not.
    spool.cut_before_index.store(true, Ordering::SeqCst);
    let mut inc = spool.begin(b"HEADER", "1.2").expect("begin");
    inc.write(b"second instance").expect("write");
    assert!(inc.commit(m, 2000).is_err());
    let mut torn = spool.begin(b"HEADER", "1.3").expect("begin");
    torn.write(b"cut in its flush").expect("write");
    assert!(torn.commit(meta("1.3"), 2000).is_err());
    let mut fixed = spool.begin(b"HEADER", "1.1").expect("begin");
    fixed.write(b"corrected version").expect("write");
    assert!(fixed.commit(meta("1.1"), 2000).is_err());
    assert_eq!(spool.records().expect("records").len(), 1);
    // 1.3's frame was cut by the power: one byte of its payload is wrong.
    let frames = spool.segments.scan(0).expect("scan");
    let f13 = frames
        .iter()
        .find(|f| {
            record::decode::<LogEntry>(&f.body)
                .is_ok_and(|e| e.record.meta.sop_instance_uid == "1.3")
        })
        .expect("frame of 1.3");
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new()
            .write(true)
            .open(spool.segments.path(f13.loc.seg))
            .expect("open"),
        b"X",
        f13.loc.at + 40,
    )
    .expect("tear");
    drop(spool);

    let (spool, report) = open_keyed();
    assert_eq!(report.replayed, 2, "{report:?}");
    assert!(!report.is_clean());
    let recs = spool.records().expect("records");
    let uids: Vec<_> = recs
        .iter()
        .map(|r| r.meta.sop_instance_uid.as_str())
        .collect();
    assert_eq!(uids, ["1.2", "1.1"], "the torn one never was acknowledged");
    assert!(
        recs.iter().all(|r| r.id != stale.id),
        "the correction replaced v1 again"
    );
    let second = &recs[0];
    assert_eq!(spool.patient_id(second).as_deref(), Some("P1"));
    assert_eq!(
        spool.read_dataset(&DatasetRef::from(second)).expect("read"),
        b"second instance"
    );
    assert!(
        spool.study("1.2.3").expect("study").is_some(),
        "the studies table has it too"
    );
    let events = audit_events(&spool);
    assert_eq!(
        events,
        [
            AuditEvent::Received,
            AuditEvent::Received,
            AuditEvent::Superseded,
            AuditEvent::Received
        ]
    );
    // Durable now: another start replays nothing.
    drop(spool);
    let (_spool, report) = open_keyed();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn log_entries_sealed_with_a_key_this_start_lacks_are_kept_not_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SpoolKey::new(zeroize::Zeroizing::new([4u8; 32]));
    let (spool, _) = open_keyed(dir.path(), key).expect("open");
    spool.cut_before_index.store(true, Ordering::SeqCst);
    let mut inc = spool.begin(b"HEADER", "1.1").expect("begin");
    inc.write(b"sealed payload").expect("write");
    assert!(inc.commit(meta("1.1"), 2000).is_err());
    drop(spool);
    // The TPM was reset: kakehashid starts without the spool key.
    let (spool, report) = open(dir.path(), 1 << 20);
    assert_eq!(report.replayed, 1, "{report:?}");
    assert_eq!(spool.records().expect("records").len(), 1);
}

/// Found by the image's power-cut test: at start the index commit ran
/// before the segments knew which of them held payloads, took them all for
/// empty, and deleted those beyond the few kept free: an acknowledged
/// instance in the fifth segment was gone.
#[test]
fn a_start_keeps_every_segment_that_holds_a_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 KiB segments: one 28 KiB payload each.
    let (spool, _) = open(dir.path(), 1 << 20);
    let body = vec![7u8; 28 << 10];
    let recs: Vec<_> = (1..=6)
        .map(|i| queued(receive(&spool, &format!("1.{i}"), &body).expect("receive")))
        .collect();
    let segs: std::collections::HashSet<u32> = recs
        .iter()
        .filter_map(|r| r.segment.map(|l| l.seg))
        .collect();
    assert_eq!(segs.len(), 6, "one segment each");
    drop(spool);
    for _ in 0..2 {
        let (spool, report) = open(dir.path(), 1 << 20);
        assert!(report.is_clean(), "{report:?}");
        for r in &recs {
            let rec = spool.get(r.id).expect("record");
            let mut want = b"HEADER".to_vec();
            want.extend_from_slice(&body);
            assert_eq!(payload(&spool, &rec), want, "{}", r.meta.sop_instance_uid);
        }
    }
}

/// Found by the image's power-cut test: the first frame of a segment whose
/// index update was also a checkpoint freed its own segment before it
/// counted there, so the next instance was written over it.
#[test]
fn a_frame_whose_index_update_is_a_checkpoint_is_not_written_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    // The last durable commit is 6 s old: the next index update is durable.
    *spool.last_durable.lock().expect("lock") =
        std::time::Instant::now() - std::time::Duration::from_secs(6);
    let first = queued(receive(&spool, "1.1", b"first payload").expect("first"));
    let second = queued(receive(&spool, "1.2", b"other payload").expect("second"));
    assert_ne!(first.segment, second.segment, "{first:?} {second:?}");
    assert_eq!(
        spool
            .read_dataset(&DatasetRef::from(&*first))
            .expect("read"),
        b"first payload"
    );
}

/// Found by the WAN benchmark: an instance that did not fit in what was
/// left of the open segment moved to a new segment even when another open
/// one had room, and the next instance started in the same nearly full
/// segment again: a new segment (64 MiB on a real spool) per instance, so
/// a backlog behind a slow line filled a 4 GiB spool with 140 MB.
#[test]
fn an_instance_that_does_not_fit_moves_to_an_open_segment_with_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 KiB segments: two 20 KiB frames each, then too little room.
    let (spool, _) = open(dir.path(), 1 << 20);
    let body = vec![5u8; 20 << 10];
    for i in 1..=6 {
        queued(receive(&spool, &format!("1.{i}"), &body).expect("receive"));
    }
    assert_eq!(
        spool.segments.allocated(),
        3 * (64 << 10),
        "two frames per segment"
    );
}

#[test]
fn a_delivery_undone_by_reopening_the_index_keeps_its_payload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let a = queued(receive(&spool, "1.1", b"aaaa").expect("a"));
    spool.checkpoint().expect("checkpoint");
    // The index as its last durable commit left it.
    let index = dir.path().join("index.redb");
    let durable = dir.path().join("index.durable");
    std::fs::copy(&index, &durable).expect("copy index");
    deliver_without_flush(&spool, a.id);
    // An I/O error fails the index; reopened, it is back at its last durable
    // commit, which lacks the delivery.
    std::fs::rename(&durable, &index).expect("put back the durable index");
    spool.db_failed.store(true, Ordering::SeqCst);
    spool.checkpoint().expect("checkpoint after the reopen");
    assert_eq!(
        spool.records().expect("records").len(),
        1,
        "the record is back"
    );
    assert_eq!(
        held_payloads(&spool, dir.path()),
        1,
        "and so is its payload, not released by the checkpoint"
    );
    assert_eq!(payload(&spool, &a), b"HEADERaaaa");
    drop(spool);
    let (spool, report) = open(dir.path(), 1 << 20);
    assert!(report.missing_payloads.is_empty(), "{report:?}");
    assert_eq!(spool.records().expect("records").len(), 1);
}
