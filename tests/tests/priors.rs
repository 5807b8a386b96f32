//! Priors: a new study from the hospital brings the patient's most recent
//! prior studies from the hospital's PACS (Orthanc, answering C-FIND and
//! C-MOVE) to the reading center, after the current study, once. Reports
//! only, studies too old, studies beyond `max_studies` and another
//! patient's studies stay where they are; resending the study fetches
//! nothing again. With DCMTK's dcmqrscp as the PACS (no Modalities in
//! Study in its answers) the SERIES-level query tells reports from images.
//! kill -9 while a prior arrives: everything arrives, and a prior whose
//! retrieval had finished is not fetched again. The rules `same_modality`
//! and `same_body_part` skip more recent studies of other kinds.

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
    study_sized(dir, tag, modality, patient, date, count, 1024)
}

fn study_sized(
    dir: &Path,
    tag: &str,
    modality: &'static str,
    patient: &str,
    date: &str,
    count: usize,
    pixel_bytes: usize,
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
        pixel_bytes,
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

/// A box relaying to `center`, with the PACS HOSPITALPACS on `pacs_port`
/// (also a source: it stores the priors) and `[priors]`: 2 studies within
/// 5 years, a study stable after 2 s.
fn relay_with_priors(center_port: u16, pacs_port: u16) -> Relay {
    relay_with_rules(center_port, pacs_port, "")
}

/// The same, with more `[priors]` keys (`rules`, TOML lines).
fn relay_with_rules(center_port: u16, pacs_port: u16, rules: &str) -> Relay {
    let mut opts = RelayOptions::to(center_port);
    opts.extra_sources = "[[dicom.sources]]\nae_title = \"HOSPITALPACS\"\n".into();
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{pacs_port}\"\n\n[priors]\nmax_studies = 2\nmax_age = \"5 years\"\nstable_after = \"2s\"\n{rules}"
    );
    Relay::start(opts)
}

/// The PACS must know the box as a move destination.
fn orthanc_knows_the_box(pacs: &Orthanc, relay: &Relay) {
    pacs.put(
        "/modalities/kakehashi",
        &serde_json::json!(["KAKEHASHI", "127.0.0.1", relay.port]),
    )
    .expect("Orthanc knows the box");
}

/// The C-MOVE's final response comes after its last instance: the
/// prefetch is recorded done a moment after the priors arrived.
fn wait_prefetch_done(relay: &Relay) {
    wait_until("the prefetch to be done", Duration::from_secs(30), || {
        studies(relay)
            .iter()
            .any(|s| s.role == "current" && s.prefetch.as_deref() == Some("done"))
    });
}

fn uids_of(sets: &[&[PathBuf]]) -> HashSet<String> {
    sets.iter().flat_map(|s| uids(s)).collect()
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
    let relay = relay_with_priors(center.port, pacs.dicom_port);
    orthanc_knows_the_box(&pacs, &relay);

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
    let expected = uids_of(&[&current, &p1, &p2]);
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
    for f in [&current, &p1, &p2] {
        assert_identical_at_center(&center, f);
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
    wait_prefetch_done(&relay);
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
    let shown = String::from_utf8_lossy(&shown.stdout);
    println!("kakehashi studies:\n{shown}");
    assert!(shown.contains("prior"), "{shown}");
    let audit = relay.audit();
    assert!(audit
        .iter()
        .any(|a| a.detail.contains("retrieved by our C-MOVE")));

    // The hospital sends the study again: it is relayed again, its priors are not.
    let prefetch_records = |relay: &Relay| {
        relay
            .audit()
            .iter()
            .filter(|a| a.event == kakehashi_control::AuditEvent::Prefetch)
            .count()
    };
    assert_eq!(
        prefetch_records(&relay),
        3,
        "chosen, first prior retrieved, done"
    );
    let requests = center.store_requests();
    let again = storescu(relay.port, "MODALITY1", &current);
    assert!(again.success, "{}", again.output);
    relay.wait_drained(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(5));
    relay.wait_drained(Duration::from_secs(30));
    assert_eq!(center.store_requests(), requests + current.len());
    assert_eq!(prefetch_records(&relay), 3, "no second prefetch");
}

/// The instances at the center, byte-compared with the files sent.
fn assert_identical_at_center(center: &StoreScp, files: &[PathBuf]) {
    for f in files {
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
}

#[test]
fn with_dcmqrscp_the_series_query_tells_reports_from_images() {
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let current = study(d, "cur", "CT", "PID-Q", "20261120", 2);
    let p1 = study(d, "p1", "CT", "PID-Q", "20250101", 2);
    // More recent than p1 but reports only: without a SERIES-level query it
    // would look like an image study (dcmqrscp returns no modalities).
    let reports = study(d, "p2", "SR", "PID-Q", "20260101", 1);
    let p3 = study(d, "p3", "MR", "PID-Q", "20240101", 2);
    let other = study(d, "other", "CT", "PID-R", "20250601", 2);
    let in_pacs: Vec<PathBuf> = p1
        .iter()
        .chain(&reports)
        .chain(&p3)
        .chain(&other)
        .cloned()
        .collect();

    let pacs_port = free_port();
    // The center is down at first: the box shows what it holds for it.
    let center_port = free_port();
    let relay = relay_with_priors(center_port, pacs_port);
    let pacs = Dcmqrscp::start(
        pacs_port,
        "HOSPITALPACS",
        &in_pacs,
        &[("KAKEHASHI", "127.0.0.1", relay.port)],
    );

    let sent = storescu(relay.port, "MODALITY1", &current);
    assert!(sent.success, "{}", sent.output);
    let expected = uids_of(&[&current, &p1, &p3]);
    wait_prefetch_done(&relay);
    wait_until("the priors spooled", Duration::from_secs(30), || {
        studies(&relay)
            .iter()
            .filter(|s| s.role == "prior")
            .map(|s| s.instances)
            .sum::<u64>()
            == 4
    });
    for s in studies(&relay) {
        assert_eq!(
            (s.acknowledged, s.pending),
            (0, s.instances),
            "nothing acknowledged while the center is down: {s:?}"
        );
    }
    let center = StoreScp::start(center_port);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while center.files().len() < expected.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        center.files().len() >= expected.len(),
        "the study and its two image priors at the center; box:\n{}\ndcmqrscp:\n{}",
        relay.log_text(),
        pacs.log_text()
    );
    relay.wait_drained(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(3));
    let got: HashSet<String> = center.arrival_order().into_iter().collect();
    assert_eq!(
        got,
        expected,
        "the study, and the two most recent image studies of its patient\n{}",
        pacs.log_text()
    );
    assert!(
        uids(&reports).is_disjoint(&got),
        "a reports-only study moved"
    );
    assert!(
        uids(&other).is_disjoint(&got),
        "another patient's study moved"
    );
    assert_identical_at_center(&center, &current);
    assert_identical_at_center(&center, &p1);
    assert_identical_at_center(&center, &p3);
    let list = studies(&relay);
    for s in &list {
        assert_eq!(
            (s.acknowledged, s.pending, s.dead_letters),
            (s.instances, 0, 0),
            "complete at the center: {s:?}"
        );
    }
    let cur = list
        .iter()
        .find(|s| s.role == "current")
        .expect("current study");
    assert_eq!(cur.prefetch.as_deref(), Some("done"), "{cur:?}");
    let detail = cur.detail.as_deref().unwrap_or_default();
    assert!(detail.contains("2 retrieved, 0 failed"), "{detail}");
}

/// How many `received` audit records each SOP Instance UID of `files` has.
fn receptions(relay: &Relay, files: &[PathBuf]) -> Vec<usize> {
    let audit = relay.audit();
    uids(files)
        .iter()
        .map(|u| {
            audit
                .iter()
                .filter(|a| {
                    a.event == kakehashi_control::AuditEvent::Received
                        && a.sop_instance_uid.as_deref() == Some(u.as_str())
                })
                .count()
        })
        .collect()
}

#[test]
fn a_crash_while_priors_arrive_loses_nothing_and_refetches_only_the_unfinished() {
    let work = tempfile::tempdir().expect("tempdir");
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let mut relay = relay_with_priors(center.port, pacs.dicom_port);
    orthanc_knows_the_box(&pacs, &relay);
    let d = work.path();
    let current = study(d, "cur", "CT", "PID-K", "20261120", 2);
    // Retrieved first (most recent), and small: done before the crash.
    let p1 = study(d, "p1", "CT", "PID-K", "20250101", 2);
    // Retrieved second, and large: the crash comes while it arrives.
    let p2 = study_sized(d, "p2", "MR", "PID-K", "20240101", 150, 64 << 10);
    for f in p1.iter().chain(&p2) {
        pacs.upload(f);
    }
    let p2_uid = testdata::study_uid_of_file(&read(&p2[0]));

    let sent = storescu(relay.port, "MODALITY1", &current);
    assert!(sent.success, "{}", sent.output);
    let mut at_kill = 0;
    wait_until(
        "the second prior to start arriving",
        Duration::from_secs(90),
        || {
            at_kill = studies(&relay)
                .iter()
                .find(|s| s.study_instance_uid == p2_uid)
                .map_or(0, |s| s.instances);
            at_kill > 0
        },
    );
    relay.kill9();
    assert!(
        (at_kill as usize) < p2.len(),
        "the crash must come while the prior arrives ({at_kill} of {} already)",
        p2.len()
    );
    relay.restart();

    let expected = uids_of(&[&current, &p1, &p2]);
    wait_until(
        "the study and both priors at the center",
        Duration::from_secs(180),
        || {
            // Files still being written have no UID yet.
            let got: HashSet<String> = center
                .files()
                .iter()
                .filter_map(|f| std::fs::read(f).ok())
                .filter_map(|b| sop_instance_of_file(&b))
                .collect();
            expected.is_subset(&got)
        },
    );
    relay.wait_drained(Duration::from_secs(60));
    let got: HashSet<String> = center.arrival_order().into_iter().collect();
    assert_eq!(got, expected, "nothing else moved");
    assert_identical_at_center(&center, &p1);
    assert_identical_at_center(&center, &p2[..5]);
    assert_eq!(
        receptions(&relay, &p1),
        vec![1; p1.len()],
        "a prior whose C-MOVE had finished before the crash was fetched again"
    );
    assert!(receptions(&relay, &p2).iter().all(|&n| n >= 1));
    wait_prefetch_done(&relay);
    let cur = studies(&relay)
        .into_iter()
        .find(|s| s.role == "current")
        .expect("current study");
    assert_eq!(cur.prefetch.as_deref(), Some("done"), "{cur:?}");
    println!(
        "killed with {at_kill} of {} instances of the second prior spooled; after the restart: {}",
        p2.len(),
        cur.detail.unwrap_or_default()
    );
}

/// Sets Body Part Examined (0018,0015) in `files`.
fn body_part(files: &[PathBuf], part: &str) {
    let out = std::process::Command::new("dcmodify")
        .args(["-nb", "-i"])
        .arg(format!("(0018,0015)={part}"))
        .args(files)
        .output()
        .expect("dcmodify");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn the_rules_keep_priors_of_the_same_modality_and_body_part() {
    let work = tempfile::tempdir().expect("tempdir");
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let relay = relay_with_rules(
        center.port,
        pacs.dicom_port,
        "same_modality = true\nsame_body_part = true\n",
    );
    orthanc_knows_the_box(&pacs, &relay);
    let d = work.path();
    let current = study(d, "cur", "CT", "PID-R", "20261120", 2);
    body_part(&current, "CHEST");
    let mr = study(d, "mr", "MR", "PID-R", "20260101", 1); // most recent, other modality
    body_part(&mr, "CHEST");
    let ct_chest = study(d, "c1", "CT", "PID-R", "20250101", 1);
    body_part(&ct_chest, "CHEST");
    let ct_head = study(d, "h1", "CT", "PID-R", "20240101", 1); // other body part
    body_part(&ct_head, "HEAD");
    let ct_chest_old = study(d, "c2", "CT", "PID-R", "20230101", 1);
    body_part(&ct_chest_old, "CHEST");
    for f in mr
        .iter()
        .chain(&ct_chest)
        .chain(&ct_head)
        .chain(&ct_chest_old)
    {
        pacs.upload(f);
    }
    let sent = storescu(relay.port, "MODALITY1", &current);
    assert!(sent.success, "{}", sent.output);
    let expected = uids_of(&[&current, &ct_chest, &ct_chest_old]);
    wait_until(
        "the study and its two priors",
        Duration::from_secs(90),
        || center.files().len() >= expected.len(),
    );
    wait_prefetch_done(&relay);
    relay.wait_drained(Duration::from_secs(30));
    let got: HashSet<String> = center.arrival_order().into_iter().collect();
    assert_eq!(
        got, expected,
        "the two most recent CT studies of the chest, not the MR or the head CT"
    );
}

/// Runs a DCMTK query/retrieve tool against the box's results port as the
/// center (AE READCENTER); (exit success, stdout + stderr).
fn as_center(tool: &str, port: u16, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(tool)
        .env("TCP_NODELAY", "1")
        .args(["-S", "-aet", "READCENTER", "-aec", "KAKEHASHI", "-v"])
        .args(args)
        .args(["127.0.0.1", &port.to_string()])
        .output()
        .expect(tool);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// findscu ran a query that the box answered with Success.
fn ok_find(out: &str) -> bool {
    out.contains("Received Final Find Response (Success)")
}

#[test]
fn the_center_asks_for_more_only_about_patients_the_box_relayed() {
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let pacs = Orthanc::start_as(None, "HOSPITALPACS", serde_json::json!({}));
    let center = StoreScp::start(free_port());
    let results_port = free_port();
    // No [priors]: nothing moves unless the center asks.
    let mut opts = RelayOptions::to(center.port);
    opts.extra_sources = "[[dicom.sources]]\nae_title = \"HOSPITALPACS\"\n".into();
    opts.extra_toml = format!(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:{}\"\n\n[results]\nlisten = \"127.0.0.1:{results_port}\"\nfrom = [\"READCENTER\"]\n",
        pacs.dicom_port
    );
    let relay = Relay::start(opts);
    orthanc_knows_the_box(&pacs, &relay);

    let current = study(d, "cur", "CT", "PID-A", "20261120", 2);
    let older = study(d, "older", "CT", "PID-A", "20200101", 3);
    let other = study(d, "other", "CT", "PID-B", "20250601", 2);
    for f in older.iter().chain(&other) {
        pacs.upload(f);
    }
    assert!(storescu(relay.port, "MODALITY1", &current).success);
    wait_until("the study at the center", Duration::from_secs(60), || {
        center.files().len() == 2
    });
    let older_study = testdata::study_uid_of_file(&read(&older[0]));
    let other_study = testdata::study_uid_of_file(&read(&other[0]));

    // C-FIND by patient: the relayed patient's studies in the PACS are
    // answered, another patient's are not, a wildcard is refused.
    let (ok, out) = as_center(
        "findscu",
        results_port,
        &[
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=PID-A",
            "-k",
            "StudyInstanceUID",
            "-k",
            "StudyDate",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&older_study) && out.contains("20200101"),
        "{out}"
    );
    let (_, out) = as_center(
        "findscu",
        results_port,
        &[
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=PID-B",
            "-k",
            "StudyInstanceUID",
        ],
    );
    assert!(
        ok_find(&out) && !out.contains(&other_study),
        "another patient's study was answered: {out}"
    );
    let (_, out) = as_center(
        "findscu",
        results_port,
        &[
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=PID*",
            "-k",
            "StudyInstanceUID",
        ],
    );
    assert!(
        !out.contains(&other_study) && !out.contains(&older_study),
        "{out}"
    );
    assert!(out.contains("UnableToProcess"), "{out}");
    // By Study Instance UID alone: answered only for a relayed patient.
    let (_, out) = as_center(
        "findscu",
        results_port,
        &[
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={other_study}"),
            "-k",
            "PatientID",
        ],
    );
    assert!(ok_find(&out) && !out.contains("PID-B"), "{out}");

    // C-MOVE of the older study to the center: through the spool, byte-
    // identical; the other patient's study is refused and never moves.
    let (ok, out) = as_center(
        "movescu",
        results_port,
        &[
            "-aem",
            "READCENTER",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={older_study}"),
        ],
    );
    assert!(ok, "{out}");
    wait_until(
        "the older study at the center",
        Duration::from_secs(60),
        || center.files().len() == 5,
    );
    assert_identical_at_center(&center, &older);
    let (_, out) = as_center(
        "movescu",
        results_port,
        &[
            "-aem",
            "READCENTER",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={other_study}"),
        ],
    );
    assert!(out.contains("Failed: UnableToProcess"), "{out}");
    let (_, out) = as_center(
        "movescu",
        results_port,
        &[
            "-aem",
            "ELSEWHERE",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={older_study}"),
        ],
    );
    assert!(out.contains("Refused: MoveDestinationUnknown"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let got: HashSet<String> = center.arrival_order().into_iter().collect();
    assert!(
        uids(&other).is_disjoint(&got),
        "another patient's study moved"
    );
    assert_eq!(got.len(), 5);

    // What was asked, answered and refused is in the audit trail, and the
    // moved study is shown as a prior.
    let audit: Vec<_> = relay
        .audit()
        .into_iter()
        .filter(|a| a.event == kakehashi_control::AuditEvent::Query)
        .collect();
    assert_eq!(audit.len(), 7, "{audit:#?}");
    assert!(audit.iter().all(|a| a.actor.starts_with("READCENTER@")));
    assert!(
        audit.iter().any(|a| a.detail.contains("withheld")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|a| a.detail.contains("3 instance(s) into the spool")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|a| a.detail.contains("refused")
            && a.detail.contains(&other_study)
            && a.detail.contains("never relayed")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().all(|a| !a.detail.contains("PID-")),
        "patient IDs in the audit: {audit:#?}"
    );
    let list = studies(&relay);
    assert!(
        list.iter().any(|s| s.role == "prior" && s.instances == 3),
        "{list:?}"
    );
}

#[test]
fn with_retrieve_get_the_priors_come_on_the_boxs_own_association() {
    let work = tempfile::tempdir().expect("tempdir");
    // The PACS knows the box's AE, but at a port where nothing listens:
    // a C-MOVE could not reach it; only C-GET can bring the priors.
    let pacs = Orthanc::start_as(
        None,
        "HOSPITALPACS",
        serde_json::json!({"kakehashi": ["KAKEHASHI", "127.0.0.1", 9]}),
    );
    let center = StoreScp::start(free_port());
    let relay = relay_with_rules(center.port, pacs.dicom_port, "retrieve = \"get\"\n");
    let d = work.path();
    let current = study(d, "cur", "CT", "PID-G", "20261120", 2);
    let p1 = study(d, "p1", "CT", "PID-G", "20250101", 3);
    let p2 = study(d, "p2", "MR", "PID-G", "20240101", 2);
    let other = study(d, "other", "CT", "PID-H", "20250601", 2);
    for f in p1.iter().chain(&p2).chain(&other) {
        pacs.upload(f);
    }
    assert!(storescu(relay.port, "MODALITY1", &current).success);
    let expected = uids_of(&[&current, &p1, &p2]);
    wait_until(
        "the study and its two priors at the center",
        Duration::from_secs(90),
        || center.files().len() >= expected.len(),
    );
    wait_prefetch_done(&relay);
    let arrived = center.arrival_order();
    let got: HashSet<String> = arrived.iter().cloned().collect();
    assert_eq!(got, expected);
    assert!(
        uids(&other).is_disjoint(&got),
        "another patient's study moved"
    );
    for f in [&current, &p1, &p2] {
        assert_identical_at_center(&center, f);
    }
    let list = studies(&relay);
    let cur = list.iter().find(|s| s.role == "current").expect("current");
    assert!(
        cur.detail
            .as_deref()
            .is_some_and(|d| d.contains("by C-GET")),
        "{cur:?}"
    );
    assert_eq!(
        list.iter().filter(|s| s.role == "prior").count(),
        2,
        "{list:?}"
    );
    let audit = relay.audit();
    assert!(
        audit
            .iter()
            .any(|a| a.detail.contains("retrieved by our C-GET")),
        "the received records name the C-GET"
    );
}
