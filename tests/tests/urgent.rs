//! Urgent findings: the reading center sends an SR with C-STORE priority
//! HIGH (pynetdicom, as a center would). The box tells the referring
//! department by e-mail through a real SMTP server (aiosmtpd, Debian's
//! python3-aiosmtpd) — after the relay was down and kakehashid was killed
//! meanwhile — with the patient, the finding, the reporting physician and
//! how to acknowledge; without an acknowledgement it tells them again and
//! the escalation list too; `kakehashi urgent ack` stops it. Every step is
//! in the audit trail. A routine report mails nobody, and an urgent report
//! for a study the box never relayed mails nobody until it is released.
//! With HL7 too, an ORU^R01 reaches a real MLLP receiver (the `hl7`
//! package); the RIS's ACK AA acknowledges the finding, an AE does not.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kakehashi_control::{AuditEvent, Request, Response, UrgentInfo, UrgentState};
use kakehashi_systest::testdata::{ct_study, sr_report, study_uid_of_file};
use kakehashi_systest::*;

/// The RIS's HL7 interface (`tests/py/mllp_receiver.py` on the `hl7`
/// package's MLLP server), answering every message with ACK `ack`.
struct Ris {
    dir: PathBuf,
    _proc: Proc,
}

impl Ris {
    fn start(port: u16, dir: &Path, ack: &str) -> Ris {
        let proc = Command::new("/usr/bin/python3")
            .arg(workspace_root().join("tests/py/mllp_receiver.py"))
            .args(["--port", &port.to_string(), "--ack", ack, "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the MLLP receiver (apt-get install python3-hl7)");
        wait_port(port, "the MLLP receiver to listen");
        Ris {
            dir: dir.to_path_buf(),
            _proc: Proc(proc),
        }
    }

    fn messages(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "hl7"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("read HL7"))
            .collect()
    }
}

fn urgent(relay: &Relay) -> Vec<UrgentInfo> {
    match relay.request(&Request::Urgent) {
        Response::Urgent { entries } => entries,
        other => panic!("urgent: {other:?}"),
    }
}

fn urgent_audit(relay: &Relay) -> Vec<String> {
    relay
        .audit()
        .into_iter()
        .filter(|a| a.event == AuditEvent::Urgent)
        .map(|a| format!("{}: {}", a.actor, a.detail))
        .collect()
}

/// A box relaying to `center`, delivering results to `pacs`, taking them on
/// `results_port`, with `[urgent]` (4 s to acknowledge; the code
/// SCT:36118008, pneumothorax, is urgent at any priority) mailing through
/// `smtp_port`; `more` follows the `[urgent.email]` section.
fn urgent_box(
    center: &StoreScp,
    pacs: &Orthanc,
    results_port: u16,
    smtp_port: u16,
    more: &str,
) -> Relay {
    let mut opts = RelayOptions::to(center.port);
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{}\"\n\n\
         [results]\nlisten = \"127.0.0.1:{results_port}\"\nfrom = [\"READCENTER\"]\n\n\
         [urgent]\nack_within = \"4s\"\ncodes = [\"SCT:36118008\"]\n\n\
         [urgent.email]\nrelay = \"127.0.0.1:{smtp_port}\"\nfrom = \"kakehashi@hospital.test\"\n\
         to = [\"referrers@hospital.test\"]\nescalate_to = [\"head@hospital.test\"]\n{more}",
        pacs.dicom_port
    );
    Relay::start(opts)
}

/// The center stores `files` to the box's results port with `priority`.
fn center_sends(results_port: u16, files: &[PathBuf], priority: &str) {
    let report = pynetdicom::store(
        results_port,
        files,
        &["--aet", "READCENTER", "--priority", priority],
    );
    let statuses: Vec<u64> = report["results"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["status"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(statuses, vec![0; files.len()], "{report}");
}

#[test]
fn an_urgent_finding_is_mailed_repeated_escalated_until_acknowledged() {
    let work = tempfile::tempdir().expect("tempdir");
    let maildir = work.path().join("maildir");
    let smtp_port = free_port();
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let results_port = free_port();
    let mut relay = urgent_box(
        &center,
        &pacs,
        results_port,
        smtp_port,
        "timeout = \"5s\"\n",
    );

    let study = ct_study(&work.path().join("study"), "urgent", 2, 1024);
    let sent = storescu(relay.port, "MODALITY1", &study);
    assert!(sent.success, "{}", sent.output);
    wait_until("the study at the center", Duration::from_secs(60), || {
        center.files().len() == 2
    });
    let study_uid = study_uid_of_file(&read(&study[0]));

    // A routine report: delivered, nobody mailed.
    let routine = sr_report(
        work.path(),
        "routine",
        &study_uid,
        "PID-URG",
        "No acute findings.",
        Some("Sato^Hanako"),
        None,
    );
    center_sends(results_port, &[routine], "medium");

    // The SMTP relay is down when the urgent report comes.
    let finding = "Tension pneumothorax, left. Immediate decompression advised.";
    let sr = sr_report(
        work.path(),
        "urgent",
        &study_uid,
        "PID-URG",
        finding,
        Some("Sato^Hanako"),
        None,
    );
    center_sends(results_port, std::slice::from_ref(&sr), "high");
    wait_until(
        "the failed notice in the audit trail",
        Duration::from_secs(30),
        || urgent_audit(&relay).iter().any(|a| a.contains("failed")),
    );
    let listed = urgent(&relay);
    assert_eq!(listed.len(), 1, "only the urgent report: {listed:?}");
    let id = listed[0].id;
    assert_eq!(listed[0].state, UrgentState::New);
    assert!(listed[0].last_error.is_some(), "{listed:?}");
    let shown = relay.cli(&["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("URGENT: 1 finding(s) not acknowledged"),
        "{shown}"
    );

    // kill -9: the urgent finding is durable, and still owed a notice.
    relay.kill9();
    relay.restart();
    let smtp = Smtp::start(smtp_port, &maildir);
    wait_until("the first e-mail", Duration::from_secs(60), || {
        !smtp.messages().is_empty()
    });
    let first = smtp.messages()[0].clone();
    println!("first notice:\n{first}");
    for needle in [
        "Subject: URGENT finding for patient PID-URG: Radiology Report",
        finding,
        "Sato^Hanako",
        "20261123 120000",
        &study_uid,
        "X-RcptTo: referrers@hospital.test",
        &format!("kakehashi urgent ack {id}"),
    ] {
        assert!(first.contains(needle), "{needle:?} not in\n{first}");
    }
    assert!(
        !first.contains("head@hospital.test"),
        "escalated at once:\n{first}"
    );

    // Nobody acknowledges: told again, the escalation list too.
    wait_until("the reminder", Duration::from_secs(30), || {
        smtp.messages().len() >= 2
    });
    let second = smtp.messages()[1].clone();
    assert!(second.contains("REMINDER 2, not acknowledged"), "{second}");
    assert!(
        second.contains("head@hospital.test") && second.contains("referrers@hospital.test"),
        "{second}"
    );
    let now = urgent(&relay);
    assert_eq!(now[0].state, UrgentState::Escalated, "{now:?}");
    assert!(now[0].notices.len() >= 2);

    // Acknowledged on the box: no more notices.
    let ack = relay.cli(&[
        "urgent",
        "ack",
        &id.to_string(),
        "--by",
        "Dr Tanaka, by phone",
    ]);
    assert!(ack.status.success(), "{ack:?}");
    let after_ack = smtp.messages().len();
    let again = relay.cli(&["urgent", "ack", &id.to_string()]);
    assert!(!again.status.success(), "acknowledged twice: {again:?}");
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        smtp.messages().len(),
        after_ack,
        "mailed after the acknowledgement"
    );
    let done = urgent(&relay);
    assert_eq!(done[0].state, UrgentState::Acknowledged);
    assert_eq!(
        done[0].acknowledged_by.as_deref(),
        Some("operator (Dr Tanaka, by phone)")
    );

    // The report itself reached the PACS, byte-identical.
    wait_until("both reports in the PACS", Duration::from_secs(30), || {
        pacs.instance_ids().len() == 2
    });

    // A routine-priority report whose SR codes a configured urgent finding.
    let coded = sr_report(
        work.path(),
        "coded",
        &study_uid,
        "PID-URG",
        "See coded finding.",
        None,
        Some(("SCT", "36118008", "Pneumothorax")),
    );
    let mails = smtp.messages().len();
    center_sends(results_port, &[coded], "medium");
    wait_until("the coded finding mailed", Duration::from_secs(30), || {
        smtp.messages().len() > mails
    });
    let mail = smtp.messages()[mails].clone();
    assert!(
        mail.contains("Urgent because:       code SCT:36118008 in the report"),
        "{mail}"
    );
    let coded_id = urgent(&relay)
        .iter()
        .find(|u| u.reason.contains("SCT:36118008"))
        .expect("listed")
        .id;
    let ack = relay.cli(&["urgent", "ack", &coded_id.to_string()]);
    assert!(ack.status.success(), "{ack:?}");

    // An urgent report for a study this box never relayed: held, nobody
    // told (it may be another hospital's patient) until it is released.
    let stray = sr_report(
        work.path(),
        "stray",
        "2.25.999000111",
        "PID-ELSEWHERE",
        "Urgent finding of someone else.",
        None,
        None,
    );
    center_sends(results_port, &[stray], "high");
    let mails = smtp.messages().len();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(smtp.messages().len(), mails, "a held result was mailed");
    let held = urgent(&relay)
        .into_iter()
        .find(|u| u.held)
        .expect("the held urgent result");
    assert!(held.held, "{held:?}");
    let release = relay.cli(&["results", "release", &held.result_id.to_string()]);
    assert!(release.status.success(), "{release:?}");
    wait_until(
        "the released finding mailed",
        Duration::from_secs(30),
        || smtp.messages().len() > mails,
    );
    assert!(smtp.messages()[mails].contains("PID-ELSEWHERE"));

    let trail = urgent_audit(&relay);
    println!("urgent audit trail:\n{}", trail.join("\n"));
    for needle in [
        "to be notified",
        "failed",
        "notice 1 of urgent finding",
        "escalated",
        "acknowledged by operator (Dr Tanaka, by phone)",
        "held: no notice until it is released",
        "released: its finding is notified now",
        "(result ",
    ] {
        assert!(
            trail.iter().any(|a| a.contains(needle)),
            "{needle:?} not in the audit trail:\n{}",
            trail.join("\n")
        );
    }
}

#[test]
fn an_hl7_ack_from_the_ris_acknowledges_an_urgent_finding_and_an_error_does_not() {
    let work = tempfile::tempdir().expect("tempdir");
    let (smtp_port, ris_port) = (free_port(), free_port());
    let smtp = Smtp::start(smtp_port, &work.path().join("maildir"));
    let ris_dir = work.path().join("ris");
    // The RIS refuses at first (AE).
    let ris = Ris::start(ris_port, &ris_dir, "AE");
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let results_port = free_port();
    let relay = urgent_box(
        &center,
        &pacs,
        results_port,
        smtp_port,
        &format!(
            "\n[urgent.hl7]\nris = \"127.0.0.1:{ris_port}\"\nreceiving_facility = \"GENERAL\"\n"
        ),
    );
    let study = ct_study(&work.path().join("study"), "hl7", 1, 1024);
    let sent = storescu(relay.port, "MODALITY1", &study);
    assert!(sent.success, "{}", sent.output);
    let study_uid = study_uid_of_file(&read(&study[0]));
    let finding = "Free air under the diaphragm | perforation?";
    let sr = sr_report(
        work.path(),
        "urgent",
        &study_uid,
        "PID-HL7",
        finding,
        Some("Sato^Hanako"),
        None,
    );
    center_sends(results_port, &[sr], "high");

    wait_until("the ORU^R01 at the RIS", Duration::from_secs(30), || {
        !ris.messages().is_empty()
    });
    let oru = ris.messages()[0].clone();
    println!("ORU^R01 as the RIS received it:\n{oru}");
    for needle in [
        "|ORU^R01^ORU_R01|",
        "|RIS|GENERAL|",
        "PID|1||PID-HL7",
        // the finding, its | escaped; abnormal flag AA; the physician
        "||Free air under the diaphragm \\F\\ perforation?|||AA|||F|||||^Sato^Hanako",
        &study_uid,
    ] {
        assert!(oru.contains(needle), "{needle:?} not in\n{oru}");
    }
    // AE: not acknowledged; the e-mail went out, reminders follow.
    wait_until(
        "the reminder after the RIS's AE",
        Duration::from_secs(30),
        || smtp.messages().len() >= 2 && ris.messages().len() >= 2,
    );
    let u = urgent(&relay);
    assert_ne!(u[0].state, UrgentState::Acknowledged, "{u:?}");
    assert!(
        urgent_audit(&relay)
            .iter()
            .any(|a| a.contains("the RIS answered AE")),
        "{:?}",
        urgent_audit(&relay)
    );

    // The RIS accepts: its ACK acknowledges the finding.
    drop(ris);
    let ris = Ris::start(ris_port, &ris_dir, "AA");
    wait_until("acknowledged by the RIS", Duration::from_secs(30), || {
        urgent(&relay)[0].state == UrgentState::Acknowledged
    });
    let u = urgent(&relay);
    let by = u[0].acknowledged_by.clone().unwrap_or_default();
    assert!(by.starts_with("RIS (HL7 ACK AA to KKH"), "{by}");
    let (mails, orus) = (smtp.messages().len(), ris.messages().len());
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(
        (smtp.messages().len(), ris.messages().len()),
        (mails, orus),
        "notified after the RIS acknowledged"
    );
}

#[test]
fn a_routine_report_reaches_the_ris_as_an_oru_until_it_is_acknowledged() {
    let work = tempfile::tempdir().expect("tempdir");
    let ris_port = free_port();
    let ris_dir = work.path().join("ris");
    // The RIS refuses at first (AE): the report is told again until AA.
    let ris = Ris::start(ris_port, &ris_dir, "AE");
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let results_port = free_port();
    // No [urgent]: only [results.hl7].
    let mut opts = RelayOptions::to(center.port);
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{}\"\n\n\
         [results]\nlisten = \"127.0.0.1:{results_port}\"\nfrom = [\"READCENTER\"]\n\n\
         [results.hl7]\nris = \"127.0.0.1:{ris_port}\"\n",
        pacs.dicom_port
    );
    let relay = Relay::start(opts);
    let study = ct_study(&work.path().join("study"), "routine", 1, 1024);
    assert!(storescu(relay.port, "MODALITY1", &study).success);
    let study_uid = study_uid_of_file(&read(&study[0]));
    let sr = sr_report(
        work.path(),
        "routine",
        &study_uid,
        "PID-ROUTINE",
        "No acute findings. Mild degenerative change.",
        Some("Sato^Hanako"),
        None,
    );
    center_sends(results_port, &[sr], "medium");

    wait_until("the ORU^R01 at the RIS", Duration::from_secs(30), || {
        !ris.messages().is_empty()
    });
    let oru = ris.messages()[0].clone();
    let segments: Vec<&str> = oru.split(['\r', '\n']).collect();
    assert!(segments[0].contains("|ORU^R01^ORU_R01|KKR"), "{oru}");
    assert!(
        segments.iter().any(|s| s.starts_with("PID|1||PID-ROUTINE")),
        "{oru}"
    );
    let obx = segments
        .iter()
        .find(|s| s.starts_with("OBX|"))
        .unwrap_or_else(|| panic!("no OBX: {oru}"));
    let fields: Vec<&str> = obx.split('|').collect();
    assert_eq!(
        fields[5], "No acute findings. Mild degenerative change.",
        "{obx}"
    );
    assert_eq!(fields[8], "N", "a routine report is flagged normal: {obx}");
    let report_audit = || -> Vec<String> {
        relay
            .audit()
            .into_iter()
            .filter(|a| a.event == AuditEvent::Report)
            .map(|a| a.detail)
            .collect()
    };
    wait_until("the AE recorded", Duration::from_secs(10), || {
        report_audit()
            .iter()
            .any(|d| d.contains("failed (attempt 1)"))
    });

    // The RIS accepts now: the retry is acknowledged, then nothing more.
    drop(ris);
    let ris = Ris::start(ris_port, &ris_dir, "AA");
    wait_until(
        "the report acknowledged by the RIS",
        Duration::from_secs(40),
        || report_audit().iter().any(|d| d.contains("ACK AA")),
    );
    let sent = ris.messages().len();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(ris.messages().len(), sent, "told again after the ACK AA");
    // Not an urgent finding: nothing in `kakehashi urgent`, no urgent records.
    assert!(urgent(&relay).is_empty());
    assert!(urgent_audit(&relay).is_empty());
    // The report itself reached the PACS.
    wait_until("the report in the PACS", Duration::from_secs(30), || {
        pacs.instance_ids().len() == 1
    });
}
