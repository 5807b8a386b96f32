//! swtpm, the software TPM 2.0, as the box's TPM in tests.

use std::process::Child;
use std::time::Duration;

use crate::netns::ns_command;

/// A swtpm instance with its own state directory, on loopback TCP (inside
/// a network namespace if given). Killed on drop; [`Swtpm::reset`] starts
/// it again with empty state, as a TPM that was cleared or replaced.
#[derive(Debug)]
pub struct Swtpm {
    child: Option<Child>,
    pub port: u16,
    netns: Option<String>,
    dir: tempfile::TempDir,
}

fn two_free_ports() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        if p < 65000 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

impl Swtpm {
    pub fn start(netns: Option<&str>) -> Swtpm {
        let mut s = Swtpm {
            child: None,
            port: two_free_ports(),
            netns: netns.map(str::to_string),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = ns_command(self.netns.as_deref(), "swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", self.dir.path().display()))
            .args([
                "--server",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", self.port),
            ])
            .args([
                "--ctrl",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", self.port + 1),
            ])
            .args(["--flags", "not-need-init,startup-clear"])
            .spawn()
            .expect("swtpm (apt-get install swtpm)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let up = || std::net::TcpStream::connect(addr.as_str()).is_ok();
        crate::wait_until("swtpm to listen", Duration::from_secs(10), || {
            match &self.netns {
                Some(ns) => crate::netns::in_netns(ns, up),
                None => up(),
            }
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The TPM is cleared or replaced: same address, new seeds, no keys.
    pub fn reset(&mut self) {
        self.kill();
        self.dir = tempfile::tempdir().expect("tempdir");
        self.spawn();
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A tpm2-tools command against this TPM; flushes what it leaves behind
    /// (swtpm has no resource manager and three object slots).
    pub fn tools(&self, args: &[&str], dir: &std::path::Path) -> std::process::Output {
        let run = |args: &[&str]| {
            ns_command(self.netns.as_deref(), args[0])
                .args(&args[1..])
                .current_dir(dir)
                .env("TPM2TOOLS_TCTI", self.tcti())
                .output()
                .expect("tpm2-tools (apt-get install tpm2-tools)")
        };
        let out = run(args);
        run(&["tpm2_flushcontext", "-t"]);
        out
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}
