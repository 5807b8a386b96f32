//! A field engineer's visit in the namespace path: swtpm as the box's TPM
//! (inside the box namespace), a site file, and `kakehashi provision`,
//! `kakehashid` and `kakehashi selftest` run inside the box namespace.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::netns::*;
use crate::tpm::Swtpm;
use crate::{bin, free_port, storescu_at, testdata, Relay, StoreOutcome};

pub const CENTER_DICOM_PORT: u16 = 11113;
/// The hospital PACS's DICOM port (answers C-ECHO in the self-test).
pub const PACS_PORT: u16 = 11104;
/// The hospital PACS's AE title (allowed to send, from the hospital's address).
pub const PACS_AE: &str = "HOSPITALPACS";
/// The hospital's SMTP relay (urgent findings), on the hospital's address.
pub const SMTP_PORT: u16 = 2525;
/// Where the box takes the center's results, on its tunnel address.
pub const RESULTS_PORT: u16 = 11114;

#[derive(Debug)]
pub struct Visit {
    pub site: Site,
    pub swtpm: Swtpm,
    pub dir: tempfile::TempDir,
    /// The box's DICOM port on its LAN address.
    pub port: u16,
    pub site_file: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
}

/// `kakehashi` run inside the box namespace.
pub fn cli_in_box(site: &Site, args: &[&str], socket: Option<&Path>) -> Output {
    let mut c = ns_command(Some(site.boxns.name()), bin("kakehashi"));
    if let Some(s) = socket {
        c.arg("--socket").arg(s);
    }
    c.args(args).output().expect("run kakehashi")
}

/// stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Visit {
    /// Namespaces, swtpm and a site file for them (the hospital's PACS at
    /// [`PACS_PORT`], the center's DICOM node at [`CENTER_DICOM_PORT`]).
    pub fn new() -> Visit {
        Visit::with_site_sections("")
    }

    /// The clinical round trip too: reports back to the hospital's PACS,
    /// urgent findings (SNOMED 36118008, pneumothorax) mailed through the
    /// hospital's relay at [`SMTP_PORT`].
    pub fn with_round_trip() -> Visit {
        Visit::with_site_sections(&format!(
            "\n[results]\n\n[urgent]\nack_within = \"10 min\"\ncodes = [\"SCT:36118008\"]\n\n[urgent.email]\nrelay = \"{HOSPITAL_IP}:{SMTP_PORT}\"\nfrom = \"kakehashi@hospital.test\"\nto = [\"radiology-referrers@hospital.test\"]\nescalate_to = [\"head-of-radiology@hospital.test\"]\n"
        ))
    }

    /// Site file sections `extra` (TOML) after the usual ones.
    fn with_site_sections(extra: &str) -> Visit {
        let site = Site::new();
        let swtpm = Swtpm::start(Some(site.boxns.name()));
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let socket = dir.path().join("control.sock");
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
ae_title = "{PACS_AE}"
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
{extra}"#,
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
        }
    }

    pub fn provision(&self, extra: &[&str]) -> Output {
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

    pub fn start(&self) -> Relay {
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
    pub fn send_study(&self, dir: &Path, tag: &str, count: usize, size: usize) -> Vec<PathBuf> {
        let files = testdata::ct_study(dir, tag, count, size);
        let sent = self.send(&files);
        assert_eq!(sent.acked.len(), files.len(), "{}", sent.output);
        files
    }

    pub fn send(&self, files: &[PathBuf]) -> StoreOutcome {
        storescu_at(
            Some(self.site.hospital.name()),
            BOX_LAN_IP,
            self.port,
            PACS_AE,
            "KAKEHASHI",
            files,
        )
    }

    pub fn selftest(&self) -> Output {
        cli_in_box(
            &self.site,
            &["selftest", "--config", self.config.to_str().expect("utf-8")],
            None,
        )
    }
}

impl Default for Visit {
    fn default() -> Self {
        Visit::new()
    }
}

/// The WireGuard public key `kakehashi provision` printed.
pub fn wireguard_key_of(provision_output: &str) -> String {
    provision_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("WireGuard public key"))
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|| panic!("no WireGuard key in:\n{provision_output}"))
}
