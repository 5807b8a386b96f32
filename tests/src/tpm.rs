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

    /// The box loses power: swtpm is killed without TPM2_Shutdown and
    /// starts again on the same state (and TPM2_Startup, as firmware does).
    pub fn power_cut(&mut self) {
        self.kill();
        self.spawn();
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
        self.tools_via(&self.tcti(), args, dir)
    }

    /// Like [`Swtpm::tools`], through another TCTI (e.g. a [`BusTap`]).
    pub fn tools_via(
        &self,
        tcti: &str,
        args: &[&str],
        dir: &std::path::Path,
    ) -> std::process::Output {
        let run = |args: &[&str]| {
            ns_command(self.netns.as_deref(), args[0])
                .args(&args[1..])
                .current_dir(dir)
                .env("TPM2TOOLS_TCTI", tcti)
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

/// A recording proxy between a TPM client and swtpm: what a logic analyser
/// on a box's TPM bus would see. Commands and responses on the command
/// channel are captured; the control channel is only forwarded.
#[derive(Debug)]
pub struct BusTap {
    pub port: u16,
    captured: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl BusTap {
    pub fn start(swtpm: &Swtpm) -> BusTap {
        use std::sync::atomic::Ordering;
        let port = crate::free_ports(2);
        let tap = BusTap {
            port,
            captured: Default::default(),
            stop: Default::default(),
        };
        for (ours, theirs, record) in [(port, swtpm.port, true), (port + 1, swtpm.port + 1, false)]
        {
            let listener =
                std::net::TcpListener::bind(("127.0.0.1", ours)).expect("bus tap listens");
            listener.set_nonblocking(true).expect("nonblocking");
            let (captured, stop) = (tap.captured.clone(), tap.stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = client.set_nonblocking(false);
                    let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", theirs)) else {
                        continue;
                    };
                    for (mut from, mut to) in [
                        (
                            client.try_clone().expect("clone"),
                            upstream.try_clone().expect("clone"),
                        ),
                        (upstream, client),
                    ] {
                        let captured = captured.clone();
                        std::thread::spawn(move || {
                            use std::io::{Read, Write};
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if record {
                                    captured
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .extend_from_slice(&buf[..n]);
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            });
        }
        tap
    }

    /// The TCTI that goes through the tap.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Everything seen on the command channel so far, both directions.
    pub fn captured(&self) -> Vec<u8> {
        self.captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn clear(&self) {
        self.captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for BusTap {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
