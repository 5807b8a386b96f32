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

impl Swtpm {
    pub fn start(netns: Option<&str>) -> Swtpm {
        let mut s = Swtpm {
            child: None,
            port: crate::free_ports(2),
            netns: netns.map(str::to_string),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        // A port taken by another process between choosing and binding makes
        // swtpm exit at once: choose again.
        for _ in 0..5 {
            if self.try_spawn() {
                return;
            }
            self.port = crate::free_ports(2);
        }
        panic!("swtpm would not start (ports taken?)");
    }

    fn try_spawn(&mut self) -> bool {
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
        let start = std::time::Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return false;
                }
            }
            let listening = match &self.netns {
                Some(ns) => crate::netns::in_netns(ns, up),
                None => up(),
            };
            // Listening, and still ours a moment later.
            if listening {
                std::thread::sleep(Duration::from_millis(50));
                return self
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_none());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "swtpm did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
