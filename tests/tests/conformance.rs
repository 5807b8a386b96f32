//! The SCP and the forwarder against a second implementation we did not
//! write (pynetdicom), and against the network faults a real site has: an
//! abort, a FIN or a RST in the middle of a large C-STORE, a RST right after
//! an acknowledgement.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kakehashi_systest::pynetdicom;
use kakehashi_systest::testdata::{self, ct_study, dataset_of_file, varied_set, Name, Syntax};
use kakehashi_systest::*;

fn uid(path: &std::path::Path) -> String {
    sop_instance_of_file(&read(path)).expect("uid")
}

/// SOP Instance UID → dataset bytes of the files sent.
fn originals(files: &[PathBuf]) -> HashMap<String, Vec<u8>> {
    files
        .iter()
        .map(|f| {
            let bytes = read(f);
            (
                sop_instance_of_file(&bytes).expect("uid"),
                dataset_of_file(&bytes).expect("dataset").to_vec(),
            )
        })
        .collect()
}

fn results(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["results"].as_array().expect("results")
}

#[test]
fn one_context_per_syntax_and_every_answer_on_the_context_used() {
    // pynetdicom proposes one presentation context per (SOP class, transfer
    // syntax) — CT alone gets several — and uses several of them on one
    // association. Each C-STORE-RSP must come back on its request's context.
    let data = tempfile::tempdir().expect("tempdir");
    let files = varied_set(data.path()).expect("data");
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    let report = pynetdicom::store(relay.port, &files, &["--per-syntax"]);
    assert_eq!(report["established"], true, "{report}");
    let mut ct_contexts = std::collections::HashSet::new();
    for r in results(&report) {
        assert_eq!(r["status"], 0, "{r}");
        assert_eq!(r["req_cx"], r["rsp_cx"], "answered on another context: {r}");
        if r["file"].as_str().is_some_and(|f| f.contains("/ct-")) {
            ct_contexts.insert(r["req_cx"].as_u64());
        }
    }
    assert!(
        ct_contexts.len() >= 3,
        "CT went on several contexts: {ct_contexts:?}"
    );
    relay.wait_drained(Duration::from_secs(60));
    let sent = originals(&files);
    let arrived: HashMap<String, Vec<u8>> = center
        .files()
        .iter()
        .map(|p| {
            let b = read(p);
            (
                sop_instance_of_file(&b).expect("uid"),
                dataset_of_file(&b).expect("ds").to_vec(),
            )
        })
        .collect();
    assert_eq!(arrived.len(), sent.len());
    for (u, ds) in &sent {
        assert!(arrived.get(u) == Some(ds), "{u} changed on the way");
    }
}

#[test]
fn a_hundred_and_twenty_contexts_priority_high_4096_byte_pdus_and_an_async_window() {
    // The box announces a 4096-byte maximum PDU and so does the center:
    // pynetdicom must fragment to it towards the box, the forwarder towards
    // the center. The sender proposes 120 contexts and an asynchronous
    // operations window of 8 (the box grants 1), and sends a STAT study with
    // C-STORE priority HIGH after a routine backlog: it arrives first.
    let data = tempfile::tempdir().expect("tempdir");
    let routine = ct_study(data.path(), "routine120", 20, 20 * 1024);
    let stat = testdata::study(
        data.path(),
        "stat120",
        "MR",
        testdata::MR_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        3,
        20 * 1024,
    )
    .expect("data");
    let center_port = free_port();
    let mut opts = RelayOptions::to(center_port);
    opts.max_pdu = Some(4096);
    let relay = Relay::start(opts);
    let common = [
        "--contexts",
        "120",
        "--async-window",
        "8",
        "--max-pdu",
        "4096",
    ];
    let first = pynetdicom::store(relay.port, &routine, &common);
    assert_eq!(first["accepted_contexts"], 120, "{first}");
    assert_eq!(first["proposed_contexts"], 120, "{first}");
    let mut high = common.to_vec();
    high.extend(["--priority", "high"]);
    let second = pynetdicom::store(relay.port, &stat, &high);
    for r in results(&first).iter().chain(results(&second)) {
        assert_eq!(r["status"], 0, "{r}");
    }
    assert!(
        relay.log_text().contains("association accepted"),
        "the async window did not cost the association"
    );

    let center = pynetdicom::Scp::start(center_port, &["--max-pdu", "4096"]);
    relay.wait_drained(Duration::from_secs(60));
    let stats = center.stats();
    let largest = stats["max_pdata"].as_u64().unwrap_or(0);
    assert!(
        (1..=4096).contains(&largest),
        "the forwarder honours the center's 4096-byte PDUs (largest {largest})"
    );
    let all: Vec<PathBuf> = routine.iter().chain(&stat).cloned().collect();
    for (u, ds) in originals(&all) {
        assert_eq!(center.dataset(&u).as_ref(), Some(&ds), "{u}");
    }
    let order: Vec<String> = stats["order"]
        .as_array()
        .expect("order")
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let stat_uids: Vec<String> = stat.iter().map(|f| uid(f)).collect();
    assert!(
        order[..3].iter().all(|u| stat_uids.contains(u)),
        "HIGH goes first: {order:?}"
    );
}

#[test]
fn a_center_answering_a700_gets_it_once_and_one_answering_c000_dead_letters_only_there() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "statuses", 5, 8 * 1024);
    let refused = uid(&files[2]);
    let (flaky_port, strict_port) = (free_port(), free_port());
    let flaky = pynetdicom::Scp::start(flaky_port, &["--statuses", "a700,a700,a700"]);
    let strict = pynetdicom::Scp::start(strict_port, &["--refuse", &format!("{refused}=c000")]);
    let mut opts = RelayOptions::to(flaky_port);
    opts.destinations = vec![
        ("flaky".into(), "READCENTER".into(), flaky_port),
        ("strict".into(), "READCENTER".into(), strict_port),
    ];
    let relay = Relay::start(opts);
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 5);
    wait_until("both destinations settle", Duration::from_secs(60), || {
        let s = relay.status();
        s.destinations[0].queued == 0 && s.destinations[1].queued == 0
    });
    let s = relay.status();
    // 0xA700 three times, then Success: retried, delivered once, nothing dead.
    assert_eq!(s.destinations[0].dead_letter, 0);
    assert_eq!(flaky.stored(), 5);
    for f in &files {
        assert_eq!(flaky.requests(&uid(f)), 4, "three refusals, one success");
    }
    // 0xC000 is permanent: dead-lettered at once, only for that destination.
    assert_eq!(s.destinations[1].dead_letter, 1);
    assert_eq!(strict.stored(), 4);
    assert_eq!(
        strict.requests(&refused),
        1,
        "a permanent failure is not retried"
    );
    let dead = match relay.request(&kakehashi_control::Request::QueueList {
        destination: Some("strict".into()),
        dead_only: true,
        limit: None,
    }) {
        kakehashi_control::Response::Queue { entries, .. } => entries,
        other => panic!("{other:?}"),
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].sop_instance_uid, refused);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("0xC000"),
        "{dead:?}"
    );
    assert!(
        flaky.dataset(&refused).is_some(),
        "the other destination has it"
    );
}

#[test]
fn eight_pynetdicom_senders_at_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    let port = relay.port;
    let senders: Vec<_> = (0..8)
        .map(|i| {
            let files = ct_study(
                &data.path().join(format!("s{i}")),
                &format!("eight{i}"),
                10,
                16 * 1024,
            );
            std::thread::spawn(move || {
                let report = pynetdicom::store(port, &files, &[]);
                results(&report).iter().filter(|r| r["status"] == 0).count()
            })
        })
        .collect();
    for s in senders {
        assert_eq!(s.join().expect("sender"), 10);
    }
    relay.wait_drained(Duration::from_secs(120));
    assert_eq!(center.files().len(), 80);
    assert_eq!(center.store_requests(), 80);
}

/// How a sender goes away in the middle of a C-STORE.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Abort,
    Fin,
    Rst,
}

/// An association with the box from MODALITY1, one context (CT, explicit
/// VR little endian, id 1), as raw bytes on a socket: for injecting faults.
async fn associate(port: u16) -> tokio::net::TcpStream {
    use dicom_ul::pdu::*;
    use kakehashi_dicom::wire;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "MODALITY1".into(),
        called_ae_title: "KAKEHASHI".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: testdata::CT_IMAGE.into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2.1".into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(65536)],
    });
    wire::write_pdu(&mut s, &rq).await.expect("rq");
    let mut buf = bytes::BytesMut::new();
    let ac = wire::read_pdu(&mut s, &mut buf, 65536)
        .await
        .expect("answer");
    assert!(matches!(ac, Pdu::AssociationAC(_)), "{ac:?}");
    s
}

/// A sender that speaks just enough DICOM to get into the middle of a
/// 50 MiB C-STORE (20 MiB sent) and then cuts the association: the network
/// faults a real site has, injected on purpose.
fn store_and_cut(port: u16, sop_instance: &str, cut: Cut) {
    use dicom_ul::pdu::*;
    use kakehashi_dicom::{dimse, wire};
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut s = associate(port).await;
        let cmd = dimse::c_store_rq(1, testdata::CT_IMAGE, sop_instance, 0);
        wire::send_command(&mut s, 1, &cmd).await.expect("command");
        // 20 MiB of a 50 MiB dataset, never the last fragment.
        let mut frame = vec![0x42u8; wire::PDATA_OVERHEAD + 16 * 1024];
        wire::frame_pdata(&mut frame, 1, false, false);
        for _ in 0..(20 * 64) {
            s.write_all(&frame).await.expect("data");
        }
        match cut {
            Cut::Abort => {
                let abort = Pdu::AbortRQ {
                    source: AbortRQSource::ServiceUser,
                };
                wire::write_pdu(&mut s, &abort).await.expect("abort");
                let _ = s.shutdown().await;
            }
            Cut::Fin => {
                let _ = s.shutdown().await;
            }
            Cut::Rst => {
                let std = s.into_std().expect("std socket");
                socket_linger_zero(&std);
                drop(std);
                return;
            }
        }
        // The box closes its side.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest),
        )
        .await;
    });
}

/// SO_LINGER 0: closing sends a RST instead of a FIN.
fn socket_linger_zero(s: &std::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, Linger, &linger).expect("SO_LINGER");
}

#[test]
fn a_cut_in_the_middle_of_a_50_mib_store_is_never_delivered_and_the_relay_keeps_serving() {
    let data = tempfile::tempdir().expect("tempdir");
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    let before = ct_study(data.path(), "beforecut", 2, 8 * 1024);
    assert_eq!(storescu(relay.port, "MODALITY1", &before).acked.len(), 2);
    relay.wait_drained(Duration::from_secs(30));
    let payloads = || std::fs::read_dir(relay.spool_dir().join("data")).map_or(0, |d| d.count());
    for (i, cut) in [Cut::Abort, Cut::Fin, Cut::Rst].into_iter().enumerate() {
        let partial = format!("2.25.4242.{i}");
        store_and_cut(relay.port, &partial, cut);
        wait_until(
            &format!("the partial instance's file to go ({cut:?})"),
            Duration::from_secs(10),
            || payloads() == 0 && relay.status().active_associations == 0,
        );
        assert_eq!(
            relay.queued(),
            0,
            "{cut:?}: nothing half-received is queued"
        );
        // The relay keeps serving.
        let after = ct_study(data.path(), &format!("after{i}"), 2, 8 * 1024);
        let out = storescu(relay.port, "MODALITY1", &after);
        assert_eq!(out.acked.len(), 2, "{cut:?}: {}", out.output);
        relay.wait_drained(Duration::from_secs(30));
        assert!(
            !center.files().iter().any(|f| uid(f) == partial),
            "{cut:?}: the partial instance reached the center"
        );
    }
    assert_eq!(center.files().len(), 2 + 3 * 2);
    let log = relay.log_text();
    assert!(log.contains("peer aborted the association"), "{log}");
    assert!(
        log.contains("without releasing") || log.contains("connection"),
        "{log}"
    );
}

#[test]
fn a_reset_right_after_the_acknowledgement_still_delivers() {
    // The sender gets Success and its connection dies at once (RST): the
    // instance is the box's now and must reach the center.
    use dicom_ul::pdu::*;
    use kakehashi_dicom::{dimse, wire};
    let data = tempfile::tempdir().expect("tempdir");
    let file = ct_study(data.path(), "rst", 1, 64 * 1024).remove(0);
    let bytes = read(&file);
    let ds = dataset_of_file(&bytes).expect("dataset").to_vec();
    let sop = uid(&file);
    let center_port = free_port();
    let relay = Relay::start(RelayOptions::to(center_port));
    let port = relay.port;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut s = associate(port).await;
        let mut buf = bytes::BytesMut::new();
        wire::send_command(
            &mut s,
            1,
            &dimse::c_store_rq(1, testdata::CT_IMAGE, &sop, 0),
        )
        .await
        .expect("command");
        let mut frame = vec![0u8; wire::PDATA_OVERHEAD + ds.len()];
        frame[wire::PDATA_OVERHEAD..].copy_from_slice(&ds);
        wire::frame_pdata(&mut frame, 1, false, true);
        tokio::io::AsyncWriteExt::write_all(&mut s, &frame)
            .await
            .expect("data");
        let rsp = wire::read_pdu(&mut s, &mut buf, 65536).await.expect("rsp");
        let Pdu::PData { data } = rsp else {
            panic!("{rsp:?}")
        };
        let c = dimse::Command::parse(&data[0].data).expect("rsp");
        assert_eq!(c.status(), Some(0), "acknowledged");
        let std = s.into_std().expect("std");
        socket_linger_zero(&std);
    });
    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(30));
    let arrived = center.files();
    assert_eq!(arrived.len(), 1);
    assert!(dataset_of_file(&read(&arrived[0])) == Some(&ds[..]));
}

#[test]
fn an_instance_refused_transiently_forever_is_flagged_stuck_and_the_operator_can_take_it_out() {
    // A center that answers 0xA700 for one instance, forever. It is retried
    // (a transient status never dead-letters by itself), but after
    // retry.stuck_after_attempts it surfaces: status, queue list, one audit
    // record; and the operator can dead-letter it, then purge it.
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "forever", 3, 8 * 1024);
    let refused = uid(&files[1]);
    let center_port = free_port();
    let center = pynetdicom::Scp::start(center_port, &["--refuse", &format!("{refused}=a700")]);
    let mut opts = RelayOptions::to(center_port);
    opts.retry_toml = "stuck_after_attempts = 3\n".into();
    let relay = Relay::start(opts);
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 3);
    wait_until(
        "the instance to be flagged stuck",
        Duration::from_secs(60),
        || relay.status().destinations[0].stuck == 1,
    );
    wait_until(
        "more attempts after the flag",
        Duration::from_secs(30),
        || center.requests(&refused) >= 5,
    );
    let d = relay.status().destinations[0].clone();
    assert_eq!((d.queued, d.dead_letter, d.stuck), (1, 0, 1), "{d:?}");
    assert_eq!(center.stored(), 2, "the others went through");
    let text = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).to_string();
    assert!(text.contains("STUCK 1"), "{text}");
    let list = String::from_utf8_lossy(&relay.cli(&["queue", "list"]).stdout).to_string();
    assert!(list.contains("STUCK") && list.contains("0xA700"), "{list}");
    let audit = relay.audit();
    let stuck: Vec<_> = audit
        .iter()
        .filter(|a| a.event == kakehashi_control::AuditEvent::Stuck)
        .collect();
    assert_eq!(
        stuck.len(),
        1,
        "flagged once, not at every retry: {stuck:?}"
    );
    assert_eq!(stuck[0].sop_instance_uid.as_deref(), Some(refused.as_str()));

    let out = relay.cli(&["queue", "dead-letter", "--stuck"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Dead-lettered 1"),
        "{out:?}"
    );
    let d = relay.status().destinations[0].clone();
    assert_eq!((d.queued, d.dead_letter, d.stuck), (0, 1, 0), "{d:?}");
    let tries = center.requests(&refused);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(center.requests(&refused), tries, "no more attempts");
    let dead = String::from_utf8_lossy(&relay.cli(&["queue", "list", "--dead"]).stdout).to_string();
    assert!(
        dead.contains("dead-lettered by the operator after"),
        "{dead}"
    );
    let purge = relay.cli(&["queue", "purge", "--all", "--yes"]);
    assert!(
        String::from_utf8_lossy(&purge.stdout).contains("Purged 1"),
        "{purge:?}"
    );
}
