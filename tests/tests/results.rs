//! Reports back: the reading center sends a PDF report (DCMTK `pdf2dcm`)
//! and an SR (`xml2dsr`) to the box's `[results]` port; they reach the
//! hospital's PACS (Orthanc) byte-identical, through the spool, across a
//! kill -9 while the PACS was unreachable. A report for a study the box
//! never relayed is held and shown, and reaches the PACS only when the
//! operator releases it. Strangers and image classes are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kakehashi_control::{Request, Response, RouteState};
use kakehashi_systest::testdata::{
    ct_study, dataset_of_file, run_ok, sr_report, study_uid_of_file,
};
use kakehashi_systest::*;

/// The smallest PDF `pdf2dcm` takes (it checks the header).
const PDF: &[u8] = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n";

/// An encapsulated PDF report; with `study`, for that study (patient and
/// study taken from the file), else for a new study of its own.
fn pdf_report(dir: &Path, name: &str, study: Option<&Path>) -> PathBuf {
    let pdf = dir.join(format!("{name}.pdf"));
    std::fs::write(&pdf, PDF).expect("write pdf");
    let out = dir.join(format!("{name}.dcm"));
    let mut cmd = std::process::Command::new("pdf2dcm");
    cmd.args(["+t", "Radiology report"]);
    match study {
        Some(f) => cmd.arg("+st").arg(f),
        None => cmd.args(["+pn", "Nobody^Known", "+pi", "PID-NOBODY"]),
    };
    run_ok(cmd.arg(&pdf).arg(&out));
    out
}

fn results(relay: &Relay) -> Vec<kakehashi_control::ResultEntry> {
    match relay.request(&Request::Results) {
        Response::Results { entries } => entries,
        other => panic!("results: {other:?}"),
    }
}

/// SOP Instance UID → dataset bytes of what Orthanc holds.
fn pacs_datasets(pacs: &Orthanc) -> HashMap<String, Vec<u8>> {
    pacs.instance_ids()
        .iter()
        .map(|id| {
            let bytes = pacs.instance_file(id);
            (
                sop_instance_of_file(&bytes).expect("uid"),
                dataset_of_file(&bytes).expect("Part 10").to_vec(),
            )
        })
        .collect()
}

#[test]
fn reports_reach_the_pacs_byte_identical_and_unknown_ones_are_held() {
    let work = tempfile::tempdir().expect("tempdir");
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let results_port = free_port();
    // The PACS is unreachable at first: results must wait in the spool.
    let dead_port = free_port();
    let mut opts = RelayOptions::to(center.port);
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{dead_port}\"\nconnect_timeout = \"1s\"\n\n[results]\nlisten = \"127.0.0.1:{results_port}\"\nfrom = [\"READCENTER\"]\n"
    );
    let mut relay = Relay::start(opts);

    // The hospital's study goes to the center.
    let study = ct_study(&work.path().join("study"), "results", 3, 2048);
    let sent = storescu(relay.port, "MODALITY1", &study);
    assert!(sent.success, "{}", sent.output);
    wait_until("the study at the center", Duration::from_secs(60), || {
        center.files().len() == 3
    });
    let study_bytes = read(&study[0]);
    let study_uid = study_uid_of_file(&study_bytes);

    // The center's reports: a PDF and an SR for the study, a PDF for a
    // study the box never saw.
    let pdf = pdf_report(work.path(), "report", Some(&study[0]));
    let sr = sr_report(
        work.path(),
        "sr",
        &study_uid,
        "PID-results",
        "No acute findings. 異常なし。",
        None,
        None,
    );
    let stray = pdf_report(work.path(), "stray", None);
    let back = storescu_to(
        results_port,
        "READCENTER",
        "KAKEHASHI",
        &[pdf.clone(), sr.clone(), stray.clone()],
    );
    assert!(back.success, "{}", back.output);
    assert_eq!(back.acked.len(), 3, "{}", back.output);

    // Acknowledged, undeliverable for now: two queued for the PACS, one held.
    let listed = results(&relay);
    assert_eq!(listed.len(), 3, "{listed:?}");
    let held: Vec<_> = listed
        .iter()
        .filter(|e| e.state == RouteState::Held)
        .collect();
    assert_eq!(held.len(), 1, "{listed:?}");
    let stray_uid = sop_instance_of_file(&read(&stray)).expect("uid");
    assert_eq!(held[0].sop_instance_uid, stray_uid);
    assert!(
        held[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no study")),
        "{:?}",
        held[0]
    );
    let pacs_status = relay
        .status()
        .destinations
        .into_iter()
        .find(|d| d.name == "pacs")
        .expect("the PACS in status");
    assert_eq!((pacs_status.queued, pacs_status.held), (2, 1));
    let shown = relay.cli(&["results"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("held") && text.contains(&stray_uid), "{text}");
    // Results never go back to the center.
    assert_eq!(center.files().len(), 3);

    // Power of the process, not of the box: kill -9, then the PACS is back.
    relay.kill9();
    let config = std::fs::read_to_string(&relay.config).expect("config");
    std::fs::write(
        &relay.config,
        config.replace(
            &format!(":{dead_port}\""),
            &format!(":{}\"", pacs.dicom_port),
        ),
    )
    .expect("config");
    relay.restart();
    wait_until("the reports in the PACS", Duration::from_secs(60), || {
        pacs.instance_ids().len() == 2
    });
    let stored = pacs_datasets(&pacs);
    for f in [&pdf, &sr] {
        let bytes = read(f);
        let uid = sop_instance_of_file(&bytes).expect("uid");
        assert!(
            stored.get(&uid).map(Vec::as_slice) == dataset_of_file(&bytes),
            "{} is not byte-identical in the PACS",
            f.display()
        );
    }
    assert!(
        !stored.contains_key(&stray_uid),
        "a held result was delivered"
    );
    // Still held after the restart, still not delivered.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pacs.instance_ids().len(), 2);
    let still: Vec<_> = results(&relay);
    assert_eq!(still.len(), 1, "{still:?}");
    assert_eq!(still[0].state, RouteState::Held);
    let audit = relay.audit();
    assert!(audit
        .iter()
        .any(|a| a.event == kakehashi_control::AuditEvent::Held
            && a.sop_instance_uid.as_deref() == Some(stray_uid.as_str())));

    // The operator checked it: released, it reaches the PACS.
    let released = relay.cli(&["results", "release", &still[0].id.to_string()]);
    assert!(released.status.success(), "{released:?}");
    wait_until(
        "the released report in the PACS",
        Duration::from_secs(30),
        || pacs.instance_ids().len() == 3,
    );
    let stored = pacs_datasets(&pacs);
    assert_eq!(
        stored.get(&stray_uid).map(Vec::as_slice),
        dataset_of_file(&read(&stray))
    );
    // The PACS stores it before its C-STORE-RSP reaches the box: the box
    // lets go of it when the response arrives, a moment later.
    wait_until(
        "the released report no longer listed",
        Duration::from_secs(30),
        || results(&relay).is_empty(),
    );

    // Refused: an AE not in results.from, and an image class.
    let stranger = storescu_to(
        results_port,
        "STRANGER",
        "KAKEHASHI",
        std::slice::from_ref(&pdf),
    );
    assert!(stranger.acked.is_empty(), "{}", stranger.output);
    let image = storescu_to(results_port, "READCENTER", "KAKEHASHI", &study[..1]);
    assert!(image.acked.is_empty(), "{}", image.output);
    assert_eq!(pacs.instance_ids().len(), 3);
    let log = relay.log_text();
    assert!(log.contains("\"STRANGER\" is not in results.from"), "{log}");
}

/// A certificate and key made with OpenSSL for `cn` in `dir`: (key, cert).
fn signer(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    run_ok(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .arg("-subj")
            .arg(format!("/CN={cn}/O=Reading Center"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (key, cert)
}

/// `input` signed with DCMTK `dcmsign` (SHA-256 MAC) into `out`.
fn dcmsign(key: &Path, cert: &Path, input: &Path, out: &Path) {
    run_ok(
        std::process::Command::new("dcmsign")
            .arg("--sign")
            .arg(key)
            .arg(cert)
            .arg("+m2")
            .arg(input)
            .arg(out),
    );
}

#[test]
fn signed_reports_are_verified_and_altered_or_foreign_ones_held() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let results_port = free_port();
    let (center_key, center_cert) = signer(dir, "center", "Dr Reader");
    let (other_key, other_cert) = signer(dir, "other", "Not The Center");
    // The certificates' notBefore is this second: sign in the next one.
    std::thread::sleep(Duration::from_millis(1100));
    let mut opts = RelayOptions::to(center.port);
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{}\"\n\n[results]\nlisten = \"127.0.0.1:{results_port}\"\nfrom = [\"READCENTER\"]\ntrusted_signers = [\"{}\"]\n",
        pacs.dicom_port,
        center_cert.display()
    );
    let relay = Relay::start(opts);

    let study = ct_study(&dir.join("study"), "signed", 2, 2048);
    assert!(storescu(relay.port, "MODALITY1", &study).success);
    wait_until("the study at the center", Duration::from_secs(60), || {
        center.files().len() == 2
    });
    let study_uid = study_uid_of_file(&read(&study[0]));
    let report = |name: &str, finding: &str| {
        sr_report(
            dir,
            name,
            &study_uid,
            "PID-signed",
            finding,
            Some("Sato^Hanako"),
            None,
        )
    };
    // Signed by the center: delivered. The same report signed, then one
    // letter of its finding changed: held. Signed by a key the box does not
    // trust: held.
    let signed = dir.join("signed.dcm");
    dcmsign(
        &center_key,
        &center_cert,
        &report("a", "No acute findings."),
        &signed,
    );
    let tampered = dir.join("tampered.dcm");
    let mut bytes = read(&signed);
    let at = bytes
        .windows(8)
        .position(|w| w == b"findings")
        .expect("the finding in the file");
    bytes[at + 7] = b'z';
    std::fs::write(&tampered, &bytes).expect("write");
    let tampered_uid = sop_instance_of_file(&bytes).expect("uid");
    let foreign = dir.join("foreign.dcm");
    dcmsign(&other_key, &other_cert, &report("b", "Fracture."), &foreign);
    let foreign_uid = sop_instance_of_file(&read(&foreign)).expect("uid");
    // DCMTK itself agrees which signatures hold.
    let verify = |f: &Path| {
        let out = std::process::Command::new("dcmsign")
            .arg("--verify")
            .arg(f)
            .output()
            .expect("dcmsign");
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
    };
    assert!(
        verify(&signed).contains("signature is OK"),
        "{}",
        verify(&signed)
    );
    assert!(
        verify(&tampered).contains("signature is invalid"),
        "{}",
        verify(&tampered)
    );

    let back = storescu_to(
        results_port,
        "READCENTER",
        "KAKEHASHI",
        &[signed.clone(), tampered.clone(), foreign.clone()],
    );
    assert_eq!(back.acked.len(), 3, "{}", back.output);

    wait_until(
        "the signed report in the PACS",
        Duration::from_secs(60),
        || !pacs.instance_ids().is_empty(),
    );
    let signed_bytes = read(&signed);
    let signed_uid = sop_instance_of_file(&signed_bytes).expect("uid");
    let stored = pacs_datasets(&pacs);
    assert_eq!(
        stored.get(&signed_uid).map(Vec::as_slice),
        dataset_of_file(&signed_bytes),
        "the signed report is not byte-identical in the PACS"
    );
    // What the PACS holds still verifies with DCMTK.
    let from_pacs = dir.join("from-pacs.dcm");
    let id = pacs
        .instance_ids()
        .into_iter()
        .next()
        .expect("one instance");
    std::fs::write(&from_pacs, pacs.instance_file(&id)).expect("write");
    assert!(
        verify(&from_pacs).contains("signature is OK"),
        "{}",
        verify(&from_pacs)
    );

    let listed = results(&relay);
    let reason = |uid: &str| {
        listed
            .iter()
            .find(|e| e.sop_instance_uid == uid)
            .filter(|e| e.state == RouteState::Held)
            .and_then(|e| e.reason.clone())
            .unwrap_or_else(|| panic!("{uid} is not held: {listed:?}"))
    };
    let why = reason(&tampered_uid);
    assert!(
        why.contains("signature fails")
            && why.contains("does not verify")
            && why.contains("CN=Dr Reader"),
        "{why}"
    );
    let why = reason(&foreign_uid);
    assert!(why.contains("not one of results.trusted_signers"), "{why}");
    let shown = String::from_utf8_lossy(&relay.cli(&["results"]).stdout).to_string();
    assert!(
        shown.contains(&tampered_uid) && shown.contains("does not verify"),
        "{shown}"
    );

    // The audit says who signed what was delivered.
    let audit = relay.audit();
    let received = audit
        .iter()
        .find(|a| {
            a.event == kakehashi_control::AuditEvent::Received
                && a.sop_instance_uid.as_deref() == Some(signed_uid.as_str())
        })
        .expect("received record");
    assert!(
        received.detail.contains("DICOM signature verified")
            && received.detail.contains("CN=Dr Reader"),
        "{}",
        received.detail
    );
    // Held ones stay out of the PACS.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pacs.instance_ids().len(), 1);
}
