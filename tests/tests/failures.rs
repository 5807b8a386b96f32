//! Every input can be wrong and every peer can fail: the box says so
//! clearly, and loses nothing it acknowledged.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kakehashi_control::{Request, Response, RouteState};
use kakehashi_systest::testdata::{self, Name, Syntax};
use kakehashi_systest::*;

use testdata::ct_study;

#[test]
fn destination_down_then_up_everything_arrives_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "outage", 40, 64 * 1024);
    let center_port = free_port();
    let relay = Relay::start(RelayOptions::to(center_port));

    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(
        out.acked.len(),
        files.len(),
        "the box acknowledges while the center is down:\n{}",
        out.output
    );

    // Several backoff rounds against a dead destination.
    wait_until(
        "three failed connection attempts",
        Duration::from_secs(30),
        || relay.status().destinations[0].connect_failures >= 3,
    );
    let s = relay.status();
    let d = &s.destinations[0];
    assert_eq!(d.queued, 40, "{d:?}");
    assert_eq!(d.dead_letter, 0, "an outage dead-letters nothing");
    let err = d.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("cannot connect") && err.contains(&center_port.to_string()),
        "status explains the failure: {err}"
    );
    let text = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).to_string();
    assert!(
        text.contains("queued 40") && text.contains("last error"),
        "{text}"
    );

    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), 40);
    assert_eq!(center.store_requests(), 40, "nothing sent twice");
    assert_eq!(relay.status().destinations[0].dead_letter, 0);
    // Each delivery is in the audit trail, with the destination and status.
    let audit = relay.audit();
    let delivered: std::collections::HashSet<_> = audit
        .iter()
        .filter(|a| {
            a.event == kakehashi_control::AuditEvent::Delivered
                && a.destination.as_deref() == Some("reading-center")
                && a.detail.contains("0x0000")
        })
        .filter_map(|a| a.sop_instance_uid.clone())
        .collect();
    let sent: std::collections::HashSet<_> = files
        .iter()
        .map(|f| sop_instance_of_file(&read(f)).expect("uid"))
        .collect();
    assert_eq!(delivered, sent, "one delivered record per instance");
}

#[test]
fn spool_full_answers_a700_and_keeps_everything_accepted() {
    let data = tempfile::tempdir().expect("tempdir");
    // 12 × 512 KiB into a 4 MiB spool while the center is down.
    let files = ct_study(data.path(), "full", 12, 512 * 1024);
    let center_port = free_port();
    let mut opts = RelayOptions::to(center_port);
    opts.max_size = "4 MiB".into();
    let relay = Relay::start(opts);

    let out = storescu(relay.port, "MODALITY1", &files);
    assert!(!out.acked.is_empty(), "{}", out.output);
    assert!(
        !out.failed.is_empty(),
        "some must be refused:\n{}",
        out.output
    );
    for (f, status) in &out.failed {
        assert!(
            status.contains("OutOfResources"),
            "{}: {status}",
            f.display()
        );
    }
    assert_eq!(out.acked.len() + out.failed.len(), files.len());
    let log = relay.log_text();
    assert!(
        log.contains("answering 0xA700") && log.contains("spool is full"),
        "the log explains the refusal"
    );
    let queued = relay.status().destinations[0].queued as usize;
    assert_eq!(
        queued,
        out.acked.len(),
        "every acknowledged instance is queued, none dropped for room"
    );

    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    let arrived: Vec<String> = center
        .files()
        .iter()
        .filter_map(|p| sop_instance_of_file(&read(p)))
        .collect();
    for f in &out.acked {
        let uid = sop_instance_of_file(&read(f)).expect("uid");
        assert!(
            arrived.contains(&uid),
            "acknowledged {} never arrived",
            f.display()
        );
    }
    // Room again: what was refused goes through now.
    let refused: Vec<_> = out.failed.iter().map(|(f, _)| f.clone()).collect();
    let again = storescu(relay.port, "MODALITY1", &refused);
    assert_eq!(again.acked.len(), refused.len(), "{}", again.output);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), files.len());
}

#[test]
fn strangers_are_rejected_and_garbage_only_costs_its_connection() {
    let center = StoreScp::start(free_port());
    let mut opts = RelayOptions::to(center.port);
    opts.extra_sources =
        "[[dicom.sources]]\nae_title = \"FARAWAY\"\naddress = \"192.0.2.0/24\"\n".into();
    let relay = Relay::start(opts);

    let unknown = echoscu(relay.port, "STRANGER");
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr).to_string()
        + &String::from_utf8_lossy(&unknown.stdout);
    assert!(
        said.contains("Calling AE Title Not Recognized"),
        "echoscu sees the reason: {said}"
    );
    let wrong_address = echoscu(relay.port, "FARAWAY");
    assert!(
        !wrong_address.status.success(),
        "a known AE from the wrong address is rejected"
    );

    // garbage, a truncated PDU, a huge announced length, a silent half-open connection
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x01, 0x00, 0x00, 0x00, 0x00, 0xC8, 0x00, 0x01][..],
        &[0x04, 0, 0xFF, 0xFF, 0xFF, 0xF0][..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", relay.port)).expect("connect");
        s.write_all(junk).expect("send junk");
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the box closes the connection
    }
    let ok = echoscu(relay.port, "MODALITY1");
    assert!(
        ok.status.success(),
        "the daemon still serves: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let also = echoscu(relay.port, "MODALITY2");
    assert!(
        also.status.success(),
        "address-restricted source from an allowed address"
    );

    let log = relay.log_text();
    assert!(
        log.contains("association rejected: calling AE title \"STRANGER\" is not in dicom.sources"),
        "{log}"
    );
    assert!(
        log.contains("\"FARAWAY\" is not allowed from address 127.0.0.1"),
        "{log}"
    );
    assert!(
        log.contains("unknown PDU type 0x47"),
        "garbage is logged: {log}"
    );
    assert!(
        log.contains("connection closed inside a 200-byte PDU"),
        "truncation is logged: {log}"
    );
    assert!(
        log.contains("more than the"),
        "oversized PDU is logged: {log}"
    );

    let audit = relay.audit();
    let rejected = audit
        .iter()
        .filter(|a| a.event == kakehashi_control::AuditEvent::AssociationRejected)
        .count();
    assert_eq!(rejected, 2, "both rejections are in the audit trail");
}

#[test]
fn refused_sop_class_is_dead_lettered_and_operators_can_act() {
    // DCMTK storescp refuses a private SOP class at negotiation: a permanent
    // failure that must be dead-lettered with its reason. (storescu will not
    // send a class it does not know, so that instance goes in with our SCU.)
    let data = tempfile::tempdir().expect("tempdir");
    let private = data.path().join("private.dcm");
    testdata::write_file(
        &private,
        &testdata::Spec {
            modality: "OT",
            sop_class: "1.3.12.2.1107.5.9.1",
            syntax: Syntax::ExplicitLe,
            name: Name::Ascii,
            patient_id: "PID-PRIV".into(),
            study_uid: "2.25.77.1".into(),
            series_uid: "2.25.77.1.1".into(),
            sop_uid: "2.25.77.1.1.1".into(),
            instance_number: 1,
            pixel_bytes: 1024,
        },
    )
    .expect("write");
    let good = ct_study(data.path(), "fine", 2, 4096);
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    let out = storescu(relay.port, "MODALITY1", &good);
    assert_eq!(out.acked.len(), 2, "{}", out.output);
    send_with_our_scu(relay.port, &[private], "1.3.12.2.1107.5.9.1", 0);

    wait_until("the dead letter", Duration::from_secs(30), || {
        relay.status().destinations[0].dead_letter == 1
    });
    relay.wait_drained(Duration::from_secs(30));
    assert_eq!(center.files().len(), 2, "the others still arrive");
    let dead = match relay.request(&Request::QueueList {
        destination: None,
        dead_only: true,
        limit: None,
    }) {
        Response::Queue { entries, .. } => entries,
        other => panic!("{other:?}"),
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].state, RouteState::DeadLetter);
    let reason = dead[0].last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("refused SOP class 1.3.12.2.1107.5.9.1"),
        "{reason}"
    );

    let listing =
        String::from_utf8_lossy(&relay.cli(&["queue", "list", "--dead"]).stdout).to_string();
    assert!(
        listing.contains("dead-letter") && listing.contains("2.25.77.1.1.1"),
        "{listing}"
    );
    let retry = relay.cli(&["queue", "retry", "--all"]);
    assert!(
        String::from_utf8_lossy(&retry.stdout).contains("Requeued 1"),
        "{retry:?}"
    );
    wait_until(
        "the retried instance to fail again",
        Duration::from_secs(30),
        || relay.status().destinations[0].dead_letter == 1,
    );
    let no_confirm = relay.cli(&["queue", "purge", "--all"]);
    assert!(
        !no_confirm.status.success(),
        "purge without a terminal or --yes does nothing"
    );
    assert_eq!(relay.status().destinations[0].dead_letter, 1);
    let purge = relay.cli(&["queue", "purge", "--all", "--yes"]);
    assert!(
        String::from_utf8_lossy(&purge.stdout).contains("Purged 1"),
        "{purge:?}"
    );
    assert_eq!(relay.status().destinations[0].dead_letter, 0);
    let bad = relay.cli(&["queue", "list", "--destination", "nowhere"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no destination named \"nowhere\""),
        "{bad:?}"
    );
    let json = relay.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json is JSON");
    assert_eq!(v["destinations"][0]["name"], "reading-center");
}

#[test]
fn a_study_sent_high_priority_overtakes_the_backlog() {
    // DCMTK's storescu cannot set the C-STORE priority, so the STAT study is
    // sent by our own SCU; the destination is DCMTK. Arrival order is read
    // from the files' modification times once the center comes up.
    let data = tempfile::tempdir().expect("tempdir");
    let backlog = ct_study(data.path(), "routine", 30, 4096);
    let stat = testdata::study(
        data.path(),
        "stat",
        "CT",
        testdata::CT_IMAGE,
        Syntax::ExplicitLe,
        Name::Ascii,
        3,
        4096,
    )
    .expect("data");
    let center_port = free_port();
    let relay = Relay::start(RelayOptions::to(center_port));
    assert_eq!(storescu(relay.port, "MODALITY1", &backlog).acked.len(), 30);
    send_with_our_scu(relay.port, &stat, testdata::CT_IMAGE, 0x0001);

    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    let arrived = center.arrival_order();
    assert_eq!(arrived.len(), 33);
    let stat_uids: Vec<String> = stat
        .iter()
        .map(|s| sop_instance_of_file(&read(s)).expect("uid"))
        .collect();
    let first = &arrived[..3];
    assert!(
        first.iter().all(|u| stat_uids.contains(u)),
        "the HIGH priority study goes first: {first:?}"
    );
}

fn send_with_our_scu(port: u16, files: &[std::path::PathBuf], sop_class: &str, priority: u16) {
    use kakehashi_dicom::scu::{Scu, ScuOptions};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let opts = ScuOptions {
            calling_ae: "MODALITY1".into(),
            called_ae: "KAKEHASHI".into(),
            max_pdu: 65536,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
        };
        let ctx = vec![(sop_class.to_string(), "1.2.840.10008.1.2.1".to_string())];
        let mut scu = Scu::connect(&format!("127.0.0.1:{port}"), &opts, &ctx)
            .await
            .expect("associate");
        let pc = scu
            .context_for(sop_class, "1.2.840.10008.1.2.1")
            .expect("the box accepts the SOP class");
        for f in files {
            let bytes = read(f);
            let uid = sop_instance_of_file(&bytes).expect("uid");
            let ds = testdata::dataset_of_file(&bytes).expect("dataset").to_vec();
            let (status, _) = scu
                .store(
                    pc,
                    sop_class,
                    &uid,
                    priority,
                    &ds[..],
                    ds.len() as u64,
                    |_| {},
                )
                .await
                .expect("store");
            assert_eq!(status, 0);
        }
        scu.release().await;
    });
}

#[test]
fn emergency_source_goes_first_and_resends_are_not_queued_twice() {
    let data = tempfile::tempdir().expect("tempdir");
    let routine = ct_study(data.path(), "ward", 20, 4096);
    let er = testdata::study(
        data.path(),
        "er",
        "CT",
        testdata::CT_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        3,
        4096,
    )
    .expect("data");
    let center_port = free_port();
    let mut opts = RelayOptions::to(center_port);
    opts.extra_sources = "[[dicom.sources]]\nae_title = \"ER_CT\"\npriority = \"high\"\n".into();
    let relay = Relay::start(opts);

    assert_eq!(storescu(relay.port, "MODALITY1", &routine).acked.len(), 20);
    assert_eq!(storescu(relay.port, "ER_CT", &er).acked.len(), 3);
    // The ward's PACS re-sends part of the study (byte-identical): acknowledged, not queued again.
    let resent = storescu(relay.port, "MODALITY1", &routine[..5]);
    assert_eq!(resent.acked.len(), 5, "{}", resent.output);
    assert_eq!(relay.queued(), 23);
    assert!(relay
        .log_text()
        .contains("duplicate of a spooled instance acknowledged"));

    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.store_requests(), 23, "each instance sent once");
    let arrived = center.arrival_order();
    let er_uids: Vec<String> = er
        .iter()
        .map(|p| sop_instance_of_file(&read(p)).expect("uid"))
        .collect();
    let first = &arrived[..3];
    assert!(
        first.iter().all(|u| er_uids.contains(u)),
        "the emergency source's study goes first: {first:?}"
    );
}

#[test]
fn a_corrected_resend_replaces_the_queued_copy_and_is_the_one_delivered() {
    // The modality sends an instance, then a corrected version of it (same
    // SOP Instance UID, other bytes) as HIGH priority while the center is
    // down. Only the correction may reach the center: a stale copy sent after
    // it would overwrite it there.
    let data = tempfile::tempdir().expect("tempdir");
    let spec = |name, instance_number| testdata::Spec {
        modality: "CT",
        sop_class: testdata::CT_IMAGE,
        syntax: Syntax::ExplicitLe,
        name,
        patient_id: "PID-FIX".into(),
        study_uid: "2.25.88.1".into(),
        series_uid: "2.25.88.1.1".into(),
        sop_uid: "2.25.88.1.1.1".into(),
        instance_number,
        pixel_bytes: 8192,
    };
    let (stale, fixed) = (data.path().join("v1.dcm"), data.path().join("v2.dcm"));
    testdata::write_file(&stale, &spec(Name::Ascii, 1)).expect("v1");
    testdata::write_file(&fixed, &spec(Name::Utf8, 1)).expect("v2");
    let center_port = free_port();
    let relay = Relay::start(RelayOptions::to(center_port));
    assert_eq!(
        storescu(relay.port, "MODALITY1", std::slice::from_ref(&stale))
            .acked
            .len(),
        1
    );
    send_with_our_scu(
        relay.port,
        std::slice::from_ref(&fixed),
        testdata::CT_IMAGE,
        0x0001,
    );
    assert_eq!(relay.queued(), 1, "the correction replaced the queued copy");

    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.store_requests(), 1, "the stale copy is never sent");
    let arrived = center.files();
    assert_eq!(arrived.len(), 1);
    assert!(
        testdata::dataset_of_file(&read(&arrived[0])) == testdata::dataset_of_file(&read(&fixed)),
        "the center holds the corrected version"
    );
    let audit = relay.audit();
    assert!(
        audit
            .iter()
            .any(|a| a.event == kakehashi_control::AuditEvent::Superseded
                && a.sop_instance_uid.as_deref() == Some("2.25.88.1.1.1")),
        "the replacement is in the audit trail"
    );
}

#[test]
fn the_same_study_from_four_senders_at_once_is_queued_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "samefour", 30, 16 * 1024);
    let center_port = free_port();
    let relay = Relay::start(RelayOptions::to(center_port));
    let port = relay.port;
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let files = files.clone();
            std::thread::spawn(move || storescu(port, "MODALITY1", &files))
        })
        .collect();
    for s in senders {
        let out = s.join().expect("sender");
        assert_eq!(out.acked.len(), 30, "{}", out.output);
    }
    assert_eq!(relay.queued(), 30, "each instance queued once");
    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.store_requests(), 30, "each instance sent once");
}

#[test]
fn a_payload_that_cannot_be_read_is_retried_not_dead_lettered() {
    // A disk that fails a read (EIO) says nothing about the bytes: the
    // instance is retried and the failure shown, never dead-lettered as
    // integrity. (A directory in the payload's place fails reads the same way.)
    let data = tempfile::tempdir().expect("tempdir");
    // Larger than half a segment: each payload in a file of its own, which
    // the test can make unreadable.
    let files = ct_study(data.path(), "eio", 2, 33 << 20);
    let center_port = free_port();
    let relay = Relay::start(RelayOptions::to(center_port));
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 2);
    let payloads: Vec<_> = std::fs::read_dir(relay.spool_dir().join("data"))
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(payloads.len(), 2);
    let broken = &payloads[0];
    let aside = data.path().join("aside.dcm");
    std::fs::rename(broken, &aside).expect("move aside");
    std::fs::create_dir(broken).expect("a directory in its place");

    let center = StoreScp::start(center_port);
    let entry = || match relay.request(&Request::QueueList {
        destination: None,
        dead_only: false,
        limit: None,
    }) {
        Response::Queue { entries, .. } => entries,
        other => panic!("{other:?}"),
    };
    wait_until(
        "the unreadable instance to be tried three times",
        Duration::from_secs(60),
        || entry().iter().any(|e| e.attempts >= 3),
    );
    let e = entry();
    assert_eq!(e.len(), 1, "the readable one was delivered: {e:?}");
    assert_eq!(e[0].state, RouteState::Queued, "{e:?}");
    let why = e[0].last_error.clone().unwrap_or_default();
    assert!(
        why.contains("cannot read the payload") && !why.contains("integrity"),
        "{why}"
    );
    assert_eq!(relay.status().destinations[0].dead_letter, 0);
    assert_eq!(center.store_requests(), 1, "nothing unreadable was sent");

    // The disk recovers: the instance goes through.
    std::fs::remove_dir(broken).expect("rmdir");
    std::fs::rename(&aside, broken).expect("restore");
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), 2);
}

#[test]
fn a_low_disk_answers_out_of_resources_and_takes_again_when_there_is_room() {
    // A 48 MiB disk with 16 MiB kept free: once free space drops below that,
    // every instance is answered 0xA700 (never 0x0110, never a fake Success)
    // and nothing accepted is touched. Freed space is used again at once.
    let disk = Tmpfs::mount("48m");
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "lowdisk", 24, 1024 * 1024);
    let filler = disk.path().join("other-data");
    std::fs::write(&filler, vec![0u8; 24 << 20]).expect("filler");
    let center_port = free_port();
    let mut opts = RelayOptions::to(center_port);
    opts.spool_dir = Some(disk.path().join("spool"));
    opts.min_free = "16 MiB".into();
    let relay = Relay::start(opts);

    let out = storescu(relay.port, "MODALITY1", &files);
    assert!(
        !out.acked.is_empty() && !out.failed.is_empty(),
        "{}",
        out.output
    );
    for (f, status) in &out.failed {
        assert!(
            status.contains("OutOfResources"),
            "{}: {status}",
            f.display()
        );
    }
    assert_eq!(out.acked.len() + out.failed.len(), files.len());
    assert!(relay
        .log_text()
        .contains("below the 16777216 bytes kept free"));
    assert_eq!(relay.queued() as usize, out.acked.len());

    std::fs::remove_file(&filler).expect("free the disk");
    let refused: Vec<_> = out.failed.iter().map(|(f, _)| f.clone()).collect();
    let again = storescu(relay.port, "MODALITY1", &refused);
    assert_eq!(again.acked.len(), refused.len(), "{}", again.output);
    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), files.len());
}

#[test]
fn an_index_that_fills_its_disk_is_out_of_space_and_heals_without_a_restart() {
    // redb refuses every transaction after an I/O error until it is opened
    // again. The index is put on its own tiny disk (a symlink), so the
    // payloads still fit and the index commit is what hits ENOSPC.
    use kakehashi_spool::{Accepted, InstanceMeta, Limits, Priority, Spool};
    let disk = Tmpfs::mount("1m");
    let base = tempfile::tempdir().expect("tempdir");
    let dir = base.path().join("spool");
    std::fs::create_dir(&dir).expect("spool dir");
    std::os::unix::fs::symlink(disk.path().join("index.redb"), dir.join("index.redb"))
        .expect("symlink");
    let limits = Limits {
        max_size: 1 << 30,
        min_free: 0,
    };
    let (spool, _) = Spool::open(&dir, vec!["center".into()], limits, 1).expect("open");
    let receive = |n: u32| {
        let uid = format!("2.25.99.{n}");
        let meta = InstanceMeta {
            sop_class_uid: testdata::CT_IMAGE.into(),
            sop_instance_uid: uid.clone(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            study_instance_uid: "2.25.99".into(),
            patient_id: "P".into(),
            source_ae: "MODALITY1".into(),
            source_ip: "127.0.0.1".into(),
            priority: Priority::Medium,
            role: Default::default(),
            amendment: false,
            arrival: Default::default(),
        };
        let mut inc = spool.begin(b"HEADER", &uid)?;
        inc.write(&[n as u8; 2048])?;
        let accepted = inc.commit(meta, 2);
        // What kakehashid's checkpointer does every second: make the index
        // durable (its failure is logged; the next reception is refused).
        let _ = spool.checkpoint();
        accepted
    };
    let filler = disk.fill("filler");
    let mut accepted = 0;
    let refused = (0..2000).find_map(|n| match receive(n) {
        Ok(Accepted::Queued { .. }) => {
            accepted += 1;
            None
        }
        Ok(other) => panic!("{other:?}"),
        Err(e) => Some(e),
    });
    let e = refused.expect("the index's disk filled up");
    println!("after {accepted} instances: {e}");
    assert!(
        e.is_out_of_space(),
        "a full disk under the index is out of space (0xA700), not a fault: {e}"
    );
    std::fs::remove_file(&filler).expect("room again");
    let Ok(Accepted::Queued { .. }) = receive(5000) else {
        panic!("with room again the index takes new instances without a restart")
    };
    let records = spool.records().expect("records").len();
    assert_eq!(records, accepted + 1, "everything accepted is still there");
    drop(spool);
    let (spool, _) = Spool::open(&dir, vec!["center".into()], limits, 3).expect("reopen");
    assert_eq!(spool.records().expect("records").len(), accepted + 1);
}

#[test]
fn a_center_that_stops_reading_mid_store_is_shown_stalled_then_timed_out() {
    // The center stops reading in the middle of a 60 MiB C-STORE (storescp
    // --sleep-during): the forwarder's write blocks once the socket buffers
    // are full. status says so; the response timeout ends the attempt
    // (never a hang); the instance is neither burnt nor dead-lettered and
    // goes through once the center reads again.
    let data = tempfile::tempdir().expect("tempdir");
    let file = testdata::study(
        data.path(),
        "stall",
        "MG",
        testdata::MG_IMAGE,
        Syntax::ExplicitLe,
        Name::Ascii,
        1,
        60 * 1024 * 1024,
    )
    .expect("data")
    .remove(0);
    let center_port = free_port();
    let sleepy = StoreScp::start_sleepy(center_port, 120);
    let mut opts = RelayOptions::to(center_port);
    opts.response_timeout = "20s".into();
    let relay = Relay::start(opts);
    let out = storescu(relay.port, "MODALITY1", std::slice::from_ref(&file));
    assert_eq!(out.acked.len(), 1, "{}", out.output);
    wait_until("status to show the stall", Duration::from_secs(40), || {
        relay.status().destinations[0].state == "stalled"
    });
    let d = relay.status().destinations[0].clone();
    assert!(d.no_progress_for_s.is_some_and(|p| p >= 15), "{d:?}");
    let text = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).to_string();
    assert!(text.contains("STALLED"), "{text}");
    wait_until(
        "the response timeout to end the attempt",
        Duration::from_secs(30),
        || {
            relay.status().destinations[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("stopped reading"))
        },
    );
    let d = relay.status().destinations[0].clone();
    assert_ne!(d.state, "stalled", "{d:?}");
    assert_eq!((d.queued, d.dead_letter), (1, 0), "{d:?}");
    drop(sleepy);
    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(120));
    let arrived = center.files();
    assert_eq!(arrived.len(), 1);
    assert!(
        testdata::dataset_of_file(&read(&arrived[0])) == testdata::dataset_of_file(&read(&file))
    );
}

/// An A-ASSOCIATE-RQ from `calling` as raw bytes.
fn association_rq(calling: &str) -> Vec<u8> {
    use dicom_ul::pdu::*;
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.into(),
        called_ae_title: "KAKEHASHI".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: "1.2.840.10008.1.1".into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    });
    let mut out = Vec::new();
    dicom_ul::pdu::write_pdu(&mut out, &rq).expect("encode");
    out
}

#[test]
fn whoever_reaches_the_port_cannot_grow_the_index_or_lock_senders_out() {
    let center = StoreScp::start(free_port());
    let mut opts = RelayOptions::to(center.port);
    opts.audit_toml = "max_records = 40\n".into();
    let relay = Relay::start(opts);
    let addr = ("127.0.0.1", relay.port);

    // 300 rejected associations in a burst: counted, not each written.
    for _ in 0..300 {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&association_rq("STRANGER")).expect("rq");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let audit = |relay: &Relay| relay.audit();
    let rejected = audit(&relay)
        .iter()
        .filter(|a| a.event == kakehashi_control::AuditEvent::AssociationRejected)
        .count();
    assert_eq!(rejected, 1, "the first is written, the rest counted");

    // 100 connections that never say anything, held open: a sender still
    // gets through (the oldest silent ones are closed to make room).
    let silent: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let ok = echoscu(relay.port, "MODALITY1");
    assert!(
        ok.status.success(),
        "a sender is served during the flood: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let rss = peak_rss(relay.pid()).expect("VmHWM");
    assert!(rss < 64 << 20, "the flood cost {} MiB", rss >> 20);
    drop(silent);

    // Past max_records, a restart prunes the index after exporting what it
    // removes: nothing is lost, the index stays bounded.
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "audited", 30, 4096);
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 30);
    relay.wait_drained(Duration::from_secs(30));
    let before: Vec<u64> = audit(&relay).iter().map(|a| a.seq).collect();
    assert!(before.len() > 40, "{}", before.len());
    let mut relay = relay;
    relay.restart();
    let kept: Vec<u64> = audit(&relay).iter().map(|a| a.seq).collect();
    assert!(kept.len() <= 40 + 5, "{} records kept", kept.len());
    let mut exported: Vec<u64> = std::fs::read_dir(relay.dir.path().join("audit"))
        .expect("export dir")
        .flat_map(|f| {
            std::fs::read_to_string(f.expect("entry").path())
                .expect("read")
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                        .as_u64()
                        .expect("seq")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    exported.sort();
    let mut all = exported.clone();
    all.extend(&kept);
    all.sort();
    all.dedup();
    let last = *before.last().expect("records");
    assert!(
        (1..=last).all(|s| all.binary_search(&s).is_ok()),
        "every record is in the index or the export"
    );
    assert!(
        exported.iter().all(|s| !kept.contains(s)),
        "moved, not copied"
    );
}
