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

#[test]
fn accepted_instances_survive_reopen_with_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean());
    let Accepted::Queued(rec) = receive(&spool, "1.1", b"dataset-bytes").expect("receive") else {
        panic!("first copy must be queued")
    };
    assert_eq!(rec.dataset_offset, 6);
    assert_eq!(rec.dataset_size, 13);
    drop(spool);
    let (spool, report) = open(dir.path(), 1 << 20);
    assert_eq!(report.records, 1);
    assert!(report.is_clean(), "{report:?}");
    let rec = spool.get(rec.id).expect("record");
    let (_, path) = spool.open_payload(rec.id).expect("payload");
    assert_eq!(fs::read(path).expect("read"), b"HEADERdataset-bytes");
    assert_eq!(spool.used_bytes(), 19);
    let audit = spool.audit_since(0, 10).expect("audit");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].event, AuditEvent::Received);
}

#[test]
fn full_spool_refuses_and_keeps_what_it_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 100);
    receive(&spool, "1.1", &[1; 60]).expect("first fits");
    let err = receive(&spool, "1.2", &[2; 60]).expect_err("second must not fit");
    assert!(err.is_out_of_space(), "{err}");
    assert_eq!(spool.records().expect("records").len(), 1);
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0,
        "temp file removed"
    );
    // the reservation of the refused instance is released
    receive(&spool, "1.3", &[3; 20]).expect("small one still fits");
}

#[test]
fn identical_duplicate_is_acknowledged_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(first) = receive(&spool, "1.1", b"same").expect("first") else {
        panic!()
    };
    assert_eq!(
        receive(&spool, "1.1", b"same").expect("dup"),
        Accepted::Duplicate { existing: first.id }
    );
    assert!(matches!(
        receive(&spool, "1.1", b"different").expect("changed"),
        Accepted::Queued(_)
    ));
    assert_eq!(spool.records().expect("records").len(), 2);
}

#[test]
fn recovery_requeues_in_flight_and_repairs_mismatches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(a) = receive(&spool, "1.1", b"aaaa").expect("a") else {
        panic!()
    };
    let Accepted::Queued(b) = receive(&spool, "1.2", b"bbbb").expect("b") else {
        panic!()
    };
    spool
        .update_route(
            a.id,
            "center",
            RouteUpdate {
                durability: Durability::Immediate,
                audit: None,
                now_ms: 3000,
                keep_payload: false,
            },
            |r| r.state = RouteState::InFlight,
        )
        .expect("in flight");
    // a crash between rename and commit, a crash mid-receive, a lost payload:
    fs::write(dir.path().join("data/00000000000000ff.dcm"), b"orphan").expect("orphan");
    fs::write(dir.path().join("tmp/0000000000000100.part"), b"partial").expect("partial");
    fs::remove_file(dir.path().join(format!("data/{:016x}.dcm", b.id))).expect("lose b");
    drop(spool);

    let (spool, report) = open(dir.path(), 1 << 20);
    assert_eq!(report.in_flight_requeued, 1);
    assert_eq!(report.orphan_files_removed, 1);
    assert_eq!(report.temp_files_removed, 1);
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
    let Accepted::Queued(c) = receive(&spool, "1.3", b"c").expect("c") else {
        panic!()
    };
    assert!(c.id > 0xff);
}

#[test]
fn delivery_deletes_payload_and_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(a) = receive(&spool, "1.1", b"aaaa").expect("a") else {
        panic!()
    };
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
    assert_eq!(spool.used_bytes(), 0);
    assert_eq!(
        fs::read_dir(dir.path().join("data")).expect("data").count(),
        0
    );
    // after delivery the same instance may be sent again (a deliberate re-send)
    assert!(matches!(
        receive(&spool, "1.1", b"aaaa").expect("resend"),
        Accepted::Queued(_)
    ));
}

#[test]
fn dead_letters_can_be_retried_or_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(a) = receive(&spool, "1.1", b"aaaa").expect("a") else {
        panic!()
    };
    let Accepted::Queued(b) = receive(&spool, "1.2", b"bbbb").expect("b") else {
        panic!()
    };
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
    let events: Vec<_> = spool
        .audit_since(0, 100)
        .expect("audit")
        .into_iter()
        .map(|a| a.event)
        .collect();
    assert!(events.contains(&AuditEvent::Retried) && events.contains(&AuditEvent::Purged));
}

#[test]
fn refuses_a_newer_record_format() {
    assert!(matches!(
        record::decode::<AuditRecord>(&[9, b'{', b'}']),
        Err(DecodeError::TooNew(9))
    ));
}

#[test]
fn a_non_durable_delivery_keeps_its_payload_until_a_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(a) = receive(&spool, "1.1", b"aaaa").expect("a") else {
        panic!()
    };
    spool
        .update_route(
            a.id,
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
    assert!(
        spool.records().expect("records").is_empty(),
        "readers see the delivery at once"
    );
    let payload = dir.path().join(format!("data/{:016x}.dcm", a.id));
    assert!(
        payload.exists(),
        "but the payload outlives it until the delivery is durable"
    );
    spool.checkpoint().expect("checkpoint");
    assert!(!payload.exists());
    assert_eq!(spool.used_bytes(), 0);
}

#[test]
fn recovery_finishes_a_rename_that_lost_the_race_with_its_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(a) = receive(&spool, "1.1", b"aaaa").expect("a") else {
        panic!()
    };
    drop(spool);
    // As if the box died after the index commit but before the rename was durable.
    let name = format!("{:016x}", a.id);
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
    let (_, path) = spool.open_payload(rec.id).expect("payload back in place");
    assert_eq!(fs::read(path).expect("read"), b"HEADERaaaa");
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0
    );
}

#[test]
fn retention_keeps_delivered_payloads_until_swept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = open(dir.path(), 1 << 20);
    let Accepted::Queued(a) = receive(&spool, "1.1", b"aaaa").expect("a") else {
        panic!()
    };
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
    let payload = dir.path().join(format!("data/{:016x}.dcm", a.id));
    assert!(payload.exists(), "retained after delivery");
    assert_eq!(spool.counts().expect("counts")["center"].queued, 0);
    assert_eq!(
        spool.sweep_retained(5000).expect("sweep"),
        0,
        "not yet past retention"
    );
    assert_eq!(spool.sweep_retained(5001).expect("sweep"), 1);
    assert!(!payload.exists());
    assert!(spool.records().expect("records").is_empty());
}

#[test]
fn a_payload_stays_until_every_destination_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) =
        Spool::open(dir.path(), vec!["a".into(), "b".into()], limits(1 << 20), 1).expect("open");
    let Accepted::Queued(rec) = receive(&spool, "1.1", b"data").expect("rec") else {
        panic!()
    };
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
    let payload = dir.path().join(format!("data/{:016x}.dcm", rec.id));
    assert!(payload.exists(), "b still needs it");
    assert_eq!(spool.counts().expect("counts")["b"].queued, 1);
    deliver("b");
    assert!(!payload.exists());
}

#[test]
fn a_keyed_spool_seals_payloads_and_patient_ids_and_catches_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SpoolKey::new(zeroize::Zeroizing::new([9u8; 32]));
    let (spool, _) = Spool::open_with_key(
        dir.path(),
        vec!["center".into()],
        limits(1 << 20),
        1000,
        Some(key.clone()),
    )
    .expect("open");
    let body = b"PATIENT^NAME dataset bytes".repeat(5000);
    let Accepted::Queued(rec) = receive(&spool, "1.1", &body).expect("receive") else {
        panic!("queued")
    };
    let (_, path) = spool.open_payload(rec.id).expect("payload");
    let on_disk = fs::read(&path).expect("read");
    assert!(seal::is_sealed(&on_disk[..4]));
    assert!(
        !on_disk.windows(12).any(|w| w == b"PATIENT^NAME"),
        "plaintext on disk"
    );
    let index = fs::read(dir.path().join("index.redb")).expect("index");
    assert!(
        !index.windows(2).any(|w| w == b"P1"),
        "Patient ID in the index"
    );
    assert_eq!(spool.patient_id(&rec).as_deref(), Some("P1"));
    let dataset = DatasetRef::from(&*rec);
    assert_eq!(spool.read_dataset(&dataset).expect("reads"), body);

    // One flipped byte anywhere: the check fails, naming integrity.
    let mut bad = on_disk.clone();
    bad[on_disk.len() / 2] ^= 0x20;
    fs::write(&path, &bad).expect("tamper");
    let e = spool
        .verify_dataset(&dataset)
        .expect_err("tampered")
        .to_string();
    assert!(e.contains("authentication"), "{e}");

    // Reopened with its key after a crash: recovery finds the payload whole.
    fs::write(&path, &on_disk).expect("restore");
    drop(spool);
    let (spool, report) = Spool::open_with_key(
        dir.path(),
        vec!["center".into()],
        limits(1 << 20),
        1000,
        Some(key),
    )
    .expect("reopen");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(spool.used_bytes(), on_disk.len() as u64);
    assert_eq!(spool.read_dataset(&dataset).expect("reads"), body);

    // Reopened without the key: the payload and the Patient ID stay sealed.
    drop(spool);
    let (spool, _) = open(dir.path(), 1 << 20);
    assert_eq!(spool.patient_id(&rec), None);
    assert!(spool.read_dataset(&dataset).is_err());
}

#[test]
fn a_sealed_payload_cut_at_a_chunk_boundary_fails_its_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SpoolKey::new(zeroize::Zeroizing::new([3u8; 32]));
    let (spool, _) = Spool::open_with_key(
        dir.path(),
        vec!["center".into()],
        limits(1 << 20),
        1000,
        Some(key),
    )
    .expect("open");
    // "HEADER" + body fills exactly two 64 KiB chunks; the file ends with
    // an empty, flagged last chunk (its tag alone).
    let body = vec![0x5a; 2 * 65536 - 6];
    let Accepted::Queued(rec) = receive(&spool, "1.9", &body).expect("receive") else {
        panic!("queued")
    };
    let dataset = DatasetRef::from(&*rec);
    spool.verify_dataset(&dataset).expect("whole file verifies");
    let (_, path) = spool.open_payload(rec.id).expect("payload");
    let bytes = fs::read(&path).expect("read");
    fs::write(&path, &bytes[..bytes.len() - 16]).expect("cut the last chunk");
    let e = spool
        .verify_dataset(&dataset)
        .expect_err("cut file")
        .to_string();
    assert!(
        e.contains("truncated") || e.contains("authentication"),
        "{e}"
    );
}
