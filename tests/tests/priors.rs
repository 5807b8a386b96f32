//! Priors: a new study from the hospital brings the patient's most recent
//! prior studies from the hospital's PACS (Orthanc, answering C-FIND and
//! C-MOVE) to the reading center, after the current study, once. Reports
//! only, studies too old, studies beyond `max_studies` and another
//! patient's studies stay where they are; resending the study fetches
//! nothing again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kakehashi_control::{Request, Response, StudyInfo};
use kakehashi_systest::testdata::{self, Name, Syntax};
use kakehashi_systest::*;

/// A study of `count` instances for patient `patient` on `date`, as a
/// modality would have made it (PatientID and StudyDate set with dcmodify).
fn study(
    dir: &Path,
    tag: &str,
    modality: &'static str,
    patient: &str,
    date: &str,
    count: usize,
) -> Vec<PathBuf> {
    let class = if modality == "SR" {
        testdata::SC_IMAGE
    } else {
        testdata::CT_IMAGE
    };
    let files = testdata::study(
        dir,
        tag,
        modality,
        class,
        Syntax::ExplicitLe,
        Name::Ascii,
        count,
        1024,
    )
    .expect("test data");
    let out = std::process::Command::new("dcmodify")
        .args(["-nb", "-m"])
        .arg(format!("(0010,0020)={patient}"))
        .arg("-m")
        .arg(format!("(0008,0020)={date}"))
        .args(&files)
        .output()
        .expect("dcmodify");
    assert!(out.status.success(), "{out:?}");
    files
}

fn uids(files: &[PathBuf]) -> HashSet<String> {
    files
        .iter()
        .map(|f| sop_instance_of_file(&read(f)).expect("uid"))
        .collect()
}

fn studies(relay: &Relay) -> Vec<StudyInfo> {
    match relay.request(&Request::Studies) {
        Response::Studies { entries } => entries,
        other => panic!("studies: {other:?}"),
    }
}

#[test]
fn a_new_study_brings_the_right_priors_once() {
    let work = tempfile::tempdir().expect("tempdir");
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let mut opts = RelayOptions::to(center.port);
    opts.extra_sources = "[[dicom.sources]]\nae_title = \"HOSPITALPACS\"\n".into();
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{}\"\n\n[priors]\nmax_studies = 2\nmax_age = \"5 years\"\nstable_after = \"2s\"\n",
        pacs.dicom_port
    );
    let relay = Relay::start(opts);
    // The PACS must know the box as a move destination.
    pacs.put(
        "/modalities/kakehashi",
        &serde_json::json!(["KAKEHASHI", "127.0.0.1", relay.port]),
    )
    .expect("Orthanc knows the box");

    let d = work.path();
    let current = study(d, "cur", "CT", "PID-A", "20261120", 3);
    let p1 = study(d, "p1", "CT", "PID-A", "20250101", 2);
    let p2 = study(d, "p2", "MR", "PID-A", "20240101", 2);
    let p3 = study(d, "p3", "CT", "PID-A", "20230101", 2); // third most recent
    let reports = study(d, "p4", "SR", "PID-A", "20260101", 1); // reports only
    let old = study(d, "p5", "CT", "PID-A", "20180101", 1); // beyond max_age
    let other = study(d, "other", "CT", "PID-B", "20250601", 2); // another patient
    for f in p1
        .iter()
        .chain(&p2)
        .chain(&p3)
        .chain(&reports)
        .chain(&old)
        .chain(&other)
    {
        pacs.upload(f);
    }

    let sent = storescu(relay.port, "MODALITY1", &current);
    assert!(sent.success, "{}", sent.output);
    let expected: HashSet<String> = uids(&current)
        .into_iter()
        .chain(uids(&p1))
        .chain(uids(&p2))
        .collect();
    wait_until(
        "the study and its two priors at the center",
        Duration::from_secs(90),
        || center.files().len() >= expected.len(),
    );
    relay.wait_drained(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    let arrived = center.arrival_order();
    let got: HashSet<String> = arrived.iter().cloned().collect();
    assert_eq!(
        got, expected,
        "exactly the study and the two most recent image priors"
    );
    for f in [&p3, &reports, &old, &other] {
        assert!(uids(f).is_disjoint(&got), "{f:?} must not move");
    }
    // Byte-identical, and after the current study.
    for f in current.iter().chain(&p1).chain(&p2) {
        let uid = sop_instance_of_file(&read(f)).expect("uid");
        let at_center = center
            .files()
            .into_iter()
            .find(|c| sop_instance_of_file(&read(c)).as_deref() == Some(uid.as_str()))
            .expect("arrived");
        assert_eq!(
            testdata::dataset_of_file(&read(&at_center)),
            testdata::dataset_of_file(&read(f)),
            "{} differs",
            f.display()
        );
    }
    let current_uids = uids(&current);
    let last_current = arrived
        .iter()
        .rposition(|u| current_uids.contains(u))
        .expect("current arrived");
    let first_prior = arrived
        .iter()
        .position(|u| !current_uids.contains(u))
        .expect("priors arrived");
    assert!(
        last_current < first_prior,
        "priors before the current study: {arrived:?}"
    );

    // What the box says.
    let list = studies(&relay);
    let cur = list
        .iter()
        .find(|s| s.role == "current")
        .expect("current study");
    assert_eq!(cur.prefetch.as_deref(), Some("done"), "{cur:?}");
    assert_eq!(cur.instances, 3);
    assert_eq!(cur.priors.len(), 2, "{cur:?}");
    let priors: Vec<_> = list.iter().filter(|s| s.role == "prior").collect();
    assert_eq!(priors.len(), 2, "{list:?}");
    assert!(priors.iter().all(|p| p.instances == 2), "{priors:?}");
    // The self-test proves the PACS takes the box's queries (and says it
    // must know the box as a move destination). Other checks of this
    // development config (no TPM keys) may fail; this one must pass.
    let st = relay.cli(&[
        "selftest",
        "--config",
        relay.config.to_str().expect("utf-8"),
    ]);
    let report = String::from_utf8_lossy(&st.stdout);
    assert!(
        report.contains("[PASS] C-FIND on the hospital PACS (HOSPITALPACS@"),
        "{report}"
    );
    let shown = relay.cli(&["studies"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("prior"));
    let audit = relay.audit();
    assert!(audit
        .iter()
        .any(|a| a.detail.contains("retrieved by our C-MOVE")));

    // The hospital sends the study again: it is relayed again, its priors are not.
    let requests = center.store_requests();
    let again = storescu(relay.port, "MODALITY1", &current);
    assert!(again.success, "{}", again.output);
    relay.wait_drained(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    relay.wait_drained(Duration::from_secs(30));
    assert_eq!(center.store_requests(), requests + current.len());
    let prefetches = relay
        .audit()
        .iter()
        .filter(|a| a.event == kakehashi_control::AuditEvent::Prefetch)
        .count();
    assert_eq!(prefetches, 2, "chosen, then retrieved: once");
}
