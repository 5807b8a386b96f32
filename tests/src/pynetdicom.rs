//! pynetdicom (from PyPI, in a venv that `scripts/deps.sh` makes under
//! `target/py`) as a second DICOM implementation we did not write: a
//! storage SCU that reports which presentation context each response came
//! on, and a storage SCP that stores bytes as received and answers with
//! scripted statuses. The peer itself is `tests/py/dicom_peer.py`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{wait_until, workspace_root, Proc};

/// The venv's interpreter (it also sees Debian's python3 packages).
pub fn python() -> PathBuf {
    let p = workspace_root().join("target/py/bin/python3");
    assert!(
        p.exists(),
        "{} is missing: run scripts/deps.sh (make test does)",
        p.display()
    );
    p
}

fn peer_script() -> PathBuf {
    workspace_root().join("tests/py/dicom_peer.py")
}

/// Sends `files` to the box with pynetdicom; `extra` are `dicom_peer.py
/// store` options. Its JSON report (see the script).
pub fn store(port: u16, files: &[PathBuf], extra: &[&str]) -> serde_json::Value {
    store_in(None, "127.0.0.1", port, files, extra)
}

/// [`store`] from network namespace `ns` (or this one) to `host`.
pub fn store_in(
    ns: Option<&str>,
    host: &str,
    port: u16,
    files: &[PathBuf],
    extra: &[&str],
) -> serde_json::Value {
    let out = crate::netns::ns_command(ns, python())
        .arg(peer_script())
        .args(["store", "--host", host, "--port", &port.to_string()])
        .args(extra)
        .args(files)
        .output()
        .expect("run pynetdicom");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pynetdicom store printed no report ({e}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A pynetdicom storage SCP (a reading center) on loopback.
#[derive(Debug)]
pub struct Scp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    _child: Proc,
}

impl Scp {
    /// `extra`: `dicom_peer.py scp` options (`--max-pdu`, `--statuses`, `--refuse`).
    pub fn start(port: u16, extra: &[&str]) -> Scp {
        let dir = tempfile::Builder::new()
            .prefix("pynetdicom-scp-")
            .tempdir()
            .expect("tempdir");
        let log = std::fs::File::create(dir.path().join("scp.log")).expect("log");
        let child = Command::new(python())
            .arg(peer_script())
            .args(["scp", "--port", &port.to_string(), "--dir"])
            .arg(dir.path().join("in"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start pynetdicom scp");
        wait_until("pynetdicom to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Scp {
            port,
            dir,
            _child: Proc(child),
        }
    }

    /// Largest P-DATA PDU received, requests per instance, instances stored.
    pub fn stats(&self) -> serde_json::Value {
        std::fs::read(self.dir.path().join("in/stats.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The dataset stored for `uid`, as received.
    pub fn dataset(&self, uid: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.path().join("in").join(format!("{uid}.dcm"))).ok()
    }

    pub fn stored(&self) -> u64 {
        self.stats()["stored"].as_u64().unwrap_or(0)
    }

    pub fn requests(&self, uid: &str) -> u64 {
        self.stats()["requests"][uid].as_u64().unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scp.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
