//! A field engineer's visit, against swtpm: `kakehashi provision` makes the
//! identity and sealed keys in the TPM and writes the config; kakehashid runs
//! the whole namespace path on those keys; `kakehashi selftest` checks it.
//! And the failure that happens in the field: the TPM is reset.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use kakehashi_systest::netns::*;
use kakehashi_systest::testdata;
use kakehashi_systest::tpm::Swtpm;
use kakehashi_systest::*;

const CENTER_DICOM_PORT: u16 = 11113;
const PACS_PORT: u16 = 11104;

struct Visit {
    site: Site,
    swtpm: Swtpm,
    dir: tempfile::TempDir,
    port: u16,
    site_file: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    _pacs: StoreScp,
    center: StoreScp,
}

fn cli_in_box(site: &Site, args: &[&str], socket: Option<&Path>) -> Output {
    let mut c = ns_command(Some(site.boxns.name()), bin("kakehashi"));
    if let Some(s) = socket {
        c.arg("--socket").arg(s);
    }
    c.args(args).output().expect("run kakehashi")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Visit {
    fn new() -> Visit {
        let site = Site::new();
        let swtpm = Swtpm::start(Some(site.boxns.name()));
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let socket = dir.path().join("control.sock");
        // The hospital's PACS answers C-ECHO (storescp does).
        let pacs = StoreScp::start_ns(PACS_PORT, dir.path(), Some(site.hospital.name()));
        let center = StoreScp::start_ns(CENTER_DICOM_PORT, dir.path(), Some(site.center.name()));
        let site_text = format!(
            r#"[site]
name = "Test General Hospital"

[box]
ae_title = "KAKEHASHI"
listen = "{BOX_LAN_IP}:{port}"
tunnel_address = "{BOX_TUNNEL_IP}/24"
tunnel_interface = "{iface}"
control_socket = "{socket}"

[[pacs]]
ae_title = "READCENTER"
address = "{HOSPITAL_IP}"
port = {PACS_PORT}

[center]
ae_title = "READCENTER"
dicom_address = "{CENTER_TUNNEL_IP}:{CENTER_DICOM_PORT}"
wg_public_key = "{center}"
wg_endpoint = "{CENTER_NAME}:{WG_PORT}"
allowed_ips = ["10.8.0.0/24"]

[tpm]
tcti = "{tcti}"
key_dir = "{keys}"

[spool]
dir = "{spool}"
max_size = "1 GiB"
"#,
            iface = site.box_interface,
            socket = socket.display(),
            center = site.center_public,
            tcti = swtpm.tcti(),
            keys = dir.path().join("keys").display(),
            spool = dir.path().join("spool").display(),
        );
        let site_file = dir.path().join("site.toml");
        std::fs::write(&site_file, site_text).expect("site file");
        let config = dir.path().join("kakehashi.toml");
        Visit {
            site,
            swtpm,
            dir,
            port,
            site_file,
            config,
            socket,
            _pacs: pacs,
            center,
        }
    }

    fn provision(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "provision",
            "--site",
            self.site_file.to_str().expect("utf-8"),
            "--config",
            self.config.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        cli_in_box(&self.site, &args, None)
    }

    fn start(&self) -> Relay {
        let logs = tempfile::tempdir().expect("tempdir");
        Relay::launch(
            logs,
            self.config.clone(),
            self.socket.clone(),
            self.port,
            Some(self.site.boxns.name().to_string()),
            BOX_LAN_IP.into(),
            Vec::new(),
        )
    }

    /// A CT study from the hospital to the box; every instance acknowledged.
    fn send_study(&self, dir: &Path, tag: &str, count: usize, size: usize) -> Vec<PathBuf> {
        let files = testdata::ct_study(dir, tag, count, size);
        let sent = self.send(&files);
        assert_eq!(sent.acked.len(), files.len(), "{}", sent.output);
        files
    }

    fn send(&self, files: &[PathBuf]) -> StoreOutcome {
        storescu_at(
            Some(self.site.hospital.name()),
            BOX_LAN_IP,
            self.port,
            "READCENTER",
            "KAKEHASHI",
            files,
        )
    }

    fn selftest(&self) -> Output {
        cli_in_box(
            &self.site,
            &["selftest", "--config", self.config.to_str().expect("utf-8")],
            None,
        )
    }
}

fn wireguard_key_of(provision_output: &str) -> String {
    provision_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("WireGuard public key"))
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|| panic!("no WireGuard key in:\n{provision_output}"))
}

#[test]
fn provision_then_the_whole_path_runs_on_tpm_keys_and_selftest_passes() {
    let mut v = Visit::new();
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
        v.center.files().len() >= files.len()
    });
    // Sealed in the spool with the TPM's key, identical at the center.
    let mut sent: Vec<_> = files
        .iter()
        .map(|f| {
            testdata::dataset_of_file(&read(f))
                .expect("dataset")
                .to_vec()
        })
        .collect();
    let mut got: Vec<_> = v
        .center
        .files()
        .iter()
        .map(|f| {
            testdata::dataset_of_file(&read(f))
                .expect("dataset")
                .to_vec()
        })
        .collect();
    sent.sort();
    got.sort();
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
        "[PASS] C-ECHO to local source READCENTER",
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
    let out = v.provision(&[]);
    assert!(out.status.success(), "{}", text(&out));
    // The center does not know this box yet: studies wait in the spool.
    let relay = v.start();
    let data = tempfile::tempdir().expect("tempdir");
    let files = v.send_study(data.path(), "reset", 4, 16 * 1024);
    drop(relay);

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
}
