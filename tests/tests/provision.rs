//! A field engineer's visit, against swtpm: `kakehashi provision` makes the
//! identity and sealed keys in the TPM and writes the config; kakehashid runs
//! the whole namespace path on those keys; `kakehashi selftest` checks it.
//! And the failure that happens in the field: the TPM is reset.

use std::time::Duration;

use kakehashi_systest::testdata;
use kakehashi_systest::visit::*;
use kakehashi_systest::*;

/// The hospital's PACS (storescp answers C-ECHO) and the center's DICOM node.
fn peers(v: &Visit) -> (StoreScp, StoreScp) {
    let pacs = StoreScp::start_as(
        PACS_PORT,
        v.dir.path(),
        Some(v.site.hospital.name()),
        PACS_AE,
    );
    let center = StoreScp::start_ns(CENTER_DICOM_PORT, v.dir.path(), Some(v.site.center.name()));
    (pacs, center)
}

#[test]
fn provision_then_the_whole_path_runs_on_tpm_keys_and_selftest_passes() {
    let mut v = Visit::new();
    let (_pacs, center) = peers(&v);
    let first = v.provision(&[]);
    let out = text(&first);
    assert!(first.status.success(), "{out}");
    println!("{out}");
    for needle in [
        "TPM swtpm:",
        "identity.tpm: created",
        "wireguard.sealed: created",
        "spool.sealed: created",
        "serial               KKH-",
        "BEGIN PUBLIC KEY",
        "BEGIN CERTIFICATE REQUEST",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let wg = wireguard_key_of(&out);
    // Idempotent: a second run keeps every key.
    let again = v.provision(&[]);
    let out2 = text(&again);
    assert!(again.status.success(), "{out2}");
    assert!(
        out2.contains("identity.tpm: kept") && out2.contains("wireguard.sealed: kept"),
        "{out2}"
    );
    assert_eq!(
        wireguard_key_of(&out2),
        wg,
        "rerunning provision changed the key"
    );
    // The key files hold no secret in the clear: the WireGuard key the box
    // uses appears nowhere in the key directory.
    let keys = v.dir.path().join("keys");
    assert!(keys.join("identity.csr.pem").exists());

    // The center enrolls the box with the key provision printed.
    v.site.set_box_public(&wg);
    let relay = v.start();
    wait_until(
        "the tunnel on the TPM-sealed key",
        Duration::from_secs(30),
        || relay.status().tunnel.is_some_and(|t| t.up),
    );
    let s = relay.status();
    let tpm = s.tpm.clone().expect("tpm section");
    assert!(tpm.problem.is_none(), "{tpm:?}");
    assert!(
        tpm.serial.as_deref().is_some_and(|x| x.starts_with("KKH-")),
        "{tpm:?}"
    );
    assert_eq!(s.tunnel.as_ref().map(|t| t.public_key.clone()), Some(wg));

    let data = tempfile::tempdir().expect("tempdir");
    let files = v.send_study(data.path(), "prov", 5, 32 * 1024);
    wait_until("the study at the center", Duration::from_secs(60), || {
        center.files().len() >= files.len()
    });
    // Every C-STORE answered, so storescp has finished writing its files.
    relay.wait_drained(Duration::from_secs(60));
    // Sealed in the spool with the TPM's key, identical at the center.
    let datasets = |paths: &[std::path::PathBuf]| {
        let mut v: Vec<Vec<u8>> = paths
            .iter()
            .map(|f| {
                testdata::dataset_of_file(&read(f))
                    .expect("dataset")
                    .to_vec()
            })
            .collect();
        v.sort();
        v
    };
    let (sent, got) = (datasets(&files), datasets(&center.files()));
    assert!(
        sent == got,
        "datasets changed on the way through the sealed spool"
    );

    let st = v.selftest();
    let report = text(&st);
    println!("{report}");
    assert!(st.status.success(), "selftest failed:\n{report}");
    for needle in [
        "[PASS] config",
        "[PASS] TPM",
        "[PASS] C-ECHO to local source HOSPITALPACS",
        "[PASS] tunnel",
        "[PASS] C-ECHO to destination",
        "[PASS] spool",
        "[PASS] clock",
    ] {
        assert!(report.contains(needle), "missing {needle:?}:\n{report}");
    }
    drop(relay);
}

#[test]
fn a_reset_tpm_is_explained_and_nothing_is_deleted() {
    let mut v = Visit::new();
    let _peers = peers(&v);
    let out = v.provision(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let wg_key = wireguard_key_of(&text(&out));
    // The center does not know this box yet: studies wait in the spool.
    let relay = v.start();
    let data = tempfile::tempdir().expect("tempdir");
    let files = v.send_study(data.path(), "reset", 4, 16 * 1024);
    // Rotating a spool key that still works while it seals queued data is
    // refused (asked of the running daemon), and --force keeps every key
    // that loads: queued instances stay readable, the center need not re-enroll.
    let rotate = v.provision(&["--rotate"]);
    assert!(!rotate.status.success(), "{}", text(&rotate));
    assert!(
        text(&rotate).contains("the spool holds 4 instance(s) sealed with it"),
        "{}",
        text(&rotate)
    );
    let forced = v.provision(&["--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(
        wireguard_key_of(&text(&forced)),
        wg_key,
        "{}",
        text(&forced)
    );
    assert!(!text(&forced).contains("replaced"), "{}", text(&forced));
    drop(relay);
    // Asked of the spool itself when the daemon is stopped.
    let rotate = v.provision(&["--rotate"]);
    assert!(
        !rotate.status.success() && text(&rotate).contains("4 instance(s)"),
        "{}",
        text(&rotate)
    );

    v.swtpm.reset();
    let relay = v.start();
    let s = relay.status();
    let tpm = s.tpm.clone().expect("tpm section");
    let problem = tpm.problem.clone().unwrap_or_default();
    assert!(
        problem.contains("reset, cleared or replaced")
            && problem.contains("kakehashi provision")
            && problem.contains("--force"),
        "{problem}"
    );
    assert_eq!(
        tpm.undecryptable,
        Some(files.len() as u64),
        "{tpm:?}\n{s:#?}\n{}",
        relay.log_text()
    );
    assert_eq!(
        s.destinations[0].queued,
        files.len() as u64,
        "nothing deleted"
    );
    assert_eq!(s.destinations[0].dead_letter, 0, "nothing dead-lettered");
    assert!(
        relay.log_text().contains("box keys unavailable"),
        "{}",
        relay.log_text()
    );
    let status_text = text(&relay.cli(&["status"]));
    assert!(
        status_text.contains("reset, cleared or replaced")
            && status_text.contains("cannot be decrypted"),
        "{status_text}"
    );
    // It accepts nothing it could not protect.
    let refused = v.send(&files[..1]);
    assert!(refused.acked.is_empty(), "{}", refused.output);

    let st = v.selftest();
    let report = text(&st);
    assert!(!st.status.success(), "{report}");
    assert!(
        report.contains("[FAIL] TPM") && report.contains("fix: the TPM no longer holds"),
        "{report}"
    );

    // Provisioning without --force refuses to replace keys silently.
    let again = v.provision(&[]);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("--force"), "{}", text(&again));
    drop(relay);

    // Re-enrollment: --force replaces what no longer loads and says what
    // becomes of the spool; the daemon then keeps the old instances as
    // "key lost" dead letters, not as tampered ones, and deletes nothing.
    let forced = v.provision(&["--force"]);
    let said = text(&forced);
    assert!(forced.status.success(), "{said}");
    assert!(
        said.contains("spool.sealed: replaced")
            && said.contains("4 instance(s) sealed with the old spool key"),
        "{said}"
    );
    assert_ne!(wireguard_key_of(&said), wg_key, "a new key for a new TPM");
    let relay = v.start();
    let s = relay.status();
    assert_eq!(s.tpm.as_ref().and_then(|t| t.problem.clone()), None);
    assert_eq!(s.destinations[0].queued, 0);
    assert_eq!(s.destinations[0].dead_letter, 4, "kept for the operator");
    let dead = text(&relay.cli(&["queue", "list", "--dead"]));
    assert_eq!(dead.matches("key lost").count(), 4, "{dead}");
    assert!(!dead.contains("integrity"), "{dead}");
    // New studies flow again under the new key.
    let fresh = v.send_study(data.path(), "after", 2, 8 * 1024);
    assert_eq!(relay.queued(), fresh.len() as u64);
}

#[test]
fn provision_gives_the_keys_to_the_service_user() {
    use std::os::unix::fs::MetadataExt;
    // The service user, made from the project's own sysusers file as the
    // package would make it.
    let sysusers = workspace_root().join("systemd/kakehashi.sysusers");
    let made = std::process::Command::new("systemd-sysusers")
        .arg(&sysusers)
        .output()
        .expect("systemd-sysusers");
    assert!(made.status.success(), "{}", text(&made));
    let user = nix::unistd::User::from_name("kakehashi")
        .expect("passwd")
        .expect("the sysusers file makes user kakehashi");

    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site.toml");
    let keys = dir.path().join("keys");
    let config = dir.path().join("kakehashi.toml");
    let example = std::fs::read_to_string(workspace_root().join("provisioning/site.toml"))
        .expect("example site file");
    std::fs::write(
        &site,
        example.replace(
            "[tpm]                             # optional section",
            &format!(
                "[tpm]\nbackend = \"software\"\nkey_dir = \"{}\"",
                keys.display()
            ),
        ),
    )
    .expect("site");
    let out = std::process::Command::new(bin("kakehashi"))
        .args(["provision", "--site"])
        .arg(&site)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("provision");
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("keys owned by kakehashi") && report.contains("software key store"),
        "{report}"
    );
    for entry in std::fs::read_dir(&keys).expect("keys").flatten() {
        let meta = entry.metadata().expect("meta");
        assert_eq!(meta.uid(), user.uid.as_raw(), "{}", entry.path().display());
    }
    let meta = std::fs::metadata(&keys).expect("meta");
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (user.uid.as_raw(), 0o700)
    );
    let meta = std::fs::metadata(&config).expect("meta");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (0, user.gid.as_raw(), 0o640)
    );
}
