//! The system-test harness: starts kakehashid and real peers (DCMTK's
//! storescu/storescp/echoscu, Orthanc) on loopback ports, and reads back
//! what arrived. Every child process is killed when its handle drops.
//!
//! Binaries under test come from `KAKEHASHI_BIN_DIR` (the Makefile builds
//! them in release mode first), else `target/release`, else `target/debug`.

#![forbid(unsafe_code)]

pub mod netns;
pub mod pynetdicom;
pub mod testdata;
pub mod tpm;
pub mod visit;
pub mod vm;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kakehashi_control::{call, Request, Response, StatusReport};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KAKEHASHI_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    for profile in ["release", "debug"] {
        let p = workspace_root().join("target").join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not built: run `cargo build --release` (make test does)");
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `n` consecutive loopback ports nobody listens on right now, and that no
/// other test of this process has been given: parallel tests pick ports at
/// the same time, and a port handed to one is not handed to another.
pub fn free_ports(n: u16) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let first = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let all = (0..n).map(|i| first.checked_add(i));
        let ok = all.clone().all(|p| {
            p.is_some_and(|p| {
                !given.contains(&p) && (p == first || TcpListener::bind(("127.0.0.1", p)).is_ok())
            })
        });
        if ok {
            given.extend(all.flatten());
            return first;
        }
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_port(port: u16, what: &str) {
    wait_until(what, Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A tmpfs of `size` (e.g. "64m") mounted on a fresh directory, unmounted
/// on drop: a small disk to fill.
#[derive(Debug)]
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("kakehashi-tmpfs-")
            .tempdir()
            .expect("tempdir");
        netns::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem to the last byte with `name`; returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write as _;
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path).expect("filler");
        let block = vec![0xffu8; 64 * 1024];
        let mut n = block.len();
        loop {
            match f.write(&block[..n]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) if n > 1 => n /= 2,
                Err(_) => break,
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A child process killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident set size (VmHWM) of a live process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The numeric fields of `/proc/<pid>/stat` after the command name (which
/// may hold spaces and parentheses): state is `[0]`, minflt `[7]`, utime
/// `[11]`, stime `[12]`.
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    Some(
        after
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time (user and system, seconds) a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let f = proc_stat(pid)?;
    let ticks = f.get(11)? + f.get(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / hz as f64)
}

/// CPU time (user + system) of this process's children that have ended
/// and been waited for, so far (`getrusage(RUSAGE_CHILDREN)`): the
/// difference around a run of storescu is its CPU time.
pub fn ended_children_cpu_secs() -> Option<f64> {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).ok()?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Some(secs(u.user_time()) + secs(u.system_time()))
}

/// Minor page faults a process has taken so far (pages it touched that
/// the kernel had to map: memory given back and taken again shows here).
pub fn minor_faults(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(7).copied()
}

#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub destinations: Vec<(String, String, u16)>,
    pub max_size: String,
    /// `spool.min_free`.
    pub min_free: String,
    /// `dicom.max_pdu` (the default when `None`).
    pub max_pdu: Option<u32>,
    /// Every destination's `response_timeout`.
    pub response_timeout: String,
    /// Every destination's `associations` (the default when `None`).
    pub associations: Option<usize>,
    /// Every destination's `linger` (1 s: tests end sooner).
    pub linger: String,
    /// More `[retry]` keys, as TOML lines.
    pub retry_toml: String,
    /// More `[audit]` keys, as TOML lines (its `dir` is in the relay's temp dir).
    pub audit_toml: String,
    /// The spool directory (default: `spool` in the relay's temp dir).
    pub spool_dir: Option<PathBuf>,
    pub retry_initial: String,
    pub retry_max: String,
    /// Extra `[[dicom.sources]]` entries, as TOML.
    pub extra_sources: String,
    pub max_associations: usize,
    /// Run kakehashid inside this network namespace.
    pub netns: Option<String>,
    /// Address the DICOM listener binds (its port is picked free).
    pub listen_host: String,
    /// Host of every destination.
    pub dest_host: String,
    /// Appended to the config (e.g. a `[tunnel]` section).
    pub extra_toml: String,
    /// Extra environment for kakehashid (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
}

impl RelayOptions {
    /// Seals the spool with software keys provisioned in `key_dir` (the
    /// same sealing a TPM-backed box does, without a TPM).
    pub fn with_software_keys(mut self, key_dir: &Path) -> RelayOptions {
        let config = kakehashi_config::TpmConfig {
            backend: kakehashi_config::KeyBackend::Software,
            key_dir: key_dir.to_path_buf(),
            pcrs: Vec::new(),
        };
        kakehashi_tpm::KeyStore::open(&config)
            .and_then(|mut s| s.provision(kakehashi_tpm::keystore::Replace::Nothing))
            .expect("provision software keys");
        self.extra_toml += &format!(
            "\n[tpm]\nbackend = \"software\"\nkey_dir = \"{}\"\n",
            key_dir.display()
        );
        self
    }

    pub fn to(dest_port: u16) -> RelayOptions {
        RelayOptions {
            destinations: vec![("reading-center".into(), "READCENTER".into(), dest_port)],
            max_size: "4 GiB".into(),
            min_free: "64 MiB".into(),
            spool_dir: None,
            max_pdu: None,
            response_timeout: "30s".into(),
            associations: None,
            linger: "1s".into(),
            retry_toml: String::new(),
            audit_toml: String::new(),
            retry_initial: "200ms".into(),
            retry_max: "1s".into(),
            extra_sources: String::new(),
            max_associations: 16,
            netns: None,
            listen_host: "127.0.0.1".into(),
            dest_host: "127.0.0.1".into(),
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

/// kakehashid under test, with its own spool, config and control socket.
#[derive(Debug)]
pub struct Relay {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Proc>,
    netns: Option<String>,
    listen_host: String,
    env: Vec<(String, String)>,
}

impl Relay {
    pub fn start(opts: RelayOptions) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("kakehashi-test-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let socket = dir.path().join("control.sock");
        let mut toml = format!(
            "[dicom]\nae_title = \"KAKEHASHI\"\nlisten = \"{}:{port}\"\nmax_associations = {}\nidle_timeout = \"30s\"\n{}\n[[dicom.sources]]\nae_title = \"MODALITY1\"\n\n[[dicom.sources]]\nae_title = \"MODALITY2\"\naddress = \"127.0.0.0/8\"\n{}\n",
            opts.listen_host,
            opts.max_associations,
            opts.max_pdu
                .map(|m| format!("max_pdu = {m}\n"))
                .unwrap_or_default(),
            opts.extra_sources
        );
        for (name, ae, p) in &opts.destinations {
            toml += &format!("[[destinations]]\nname = \"{name}\"\nae_title = \"{ae}\"\naddress = \"{}:{p}\"\nconnect_timeout = \"2s\"\nresponse_timeout = \"{}\"\nlinger = \"{}\"\n{}\n", opts.dest_host, opts.response_timeout, opts.linger, opts.associations.map(|n| format!("associations = {n}\n")).unwrap_or_default());
        }
        toml += &format!(
            "[spool]\ndir = \"{}\"\nmax_size = \"{}\"\nmin_free = \"{}\"\n\n[retry]\ninitial = \"{}\"\nmax = \"{}\"\n{}\n[control]\nsocket = \"{}\"\n\n[log]\nformat = \"text\"\nlevel = \"info\"\n\n[audit]\ndir = \"{}\"\n{}\n",
            opts.spool_dir
                .clone()
                .unwrap_or_else(|| dir.path().join("spool"))
                .display(),
            opts.max_size,
            opts.min_free,
            opts.retry_initial,
            opts.retry_max,
            opts.retry_toml,
            socket.display(),
            dir.path().join("audit").display(),
            opts.audit_toml,
        );
        toml += &opts.extra_toml;
        let config = dir.path().join("kakehashi.toml");
        std::fs::write(&config, toml).expect("write config");
        Relay::launch(
            dir,
            config,
            socket,
            port,
            opts.netns,
            opts.listen_host,
            opts.env,
        )
    }

    /// Starts kakehashid on a config written elsewhere (e.g. by `kakehashi
    /// provision`); `dir` holds its log and is removed on drop.
    pub fn launch(
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: PathBuf,
        port: u16,
        netns: Option<String>,
        listen_host: String,
        env: Vec<(String, String)>,
    ) -> Relay {
        let log = dir.path().join("kakehashid.log");
        let mut relay = Relay {
            dir,
            port,
            config,
            socket,
            log,
            child: None,
            netns,
            listen_host,
            env,
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = netns::ns_command(self.netns.as_deref(), bin("kakehashid"))
            .arg("--config")
            .arg(&self.config)
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kakehashid");
        self.child = Some(Proc(child));
        let port = self.port;
        let socket = self.socket.clone();
        let (netns, host) = (self.netns.clone(), self.listen_host.clone());
        let listening = move || {
            let addr: std::net::SocketAddr =
                format!("{host}:{port}").parse().expect("listen address");
            let connect = || std::net::TcpStream::connect(addr).is_ok();
            match &netns {
                Some(ns) => netns::in_netns(ns, connect),
                None => connect(),
            }
        };
        let start = Instant::now();
        while !(listening() && call(&socket, &Request::Status).is_ok()) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "kakehashid did not serve within 30 s; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Proc::pid)
            .expect("kakehashid running")
    }

    /// SIGKILL, no warning, no cleanup.
    pub fn kill9(&mut self) {
        self.child = None;
    }

    /// SIGTERM, then waits (at most 30 s) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut proc = self.child.take().expect("kakehashid running");
        // nix rather than /usr/bin/kill: procps is not on every fresh machine.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(proc.pid()).expect("pid fits i32"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM");
        let start = Instant::now();
        loop {
            if let Some(status) = proc.0.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "kakehashid did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self) {
        self.child = None;
        self.spawn();
    }

    pub fn request(&self, req: &Request) -> Response {
        call(&self.socket, req).expect("control socket answers")
    }

    pub fn status(&self) -> StatusReport {
        match self.request(&Request::Status) {
            Response::Status(s) => *s,
            other => panic!("status: {other:?}"),
        }
    }

    /// The whole audit trail kept in the index (up to 10 000 records).
    pub fn audit(&self) -> Vec<kakehashi_control::AuditRecord> {
        match self.request(&Request::Audit {
            after: 0,
            limit: 10_000,
        }) {
            Response::Audit { records } => records,
            other => panic!("audit: {other:?}"),
        }
    }

    pub fn queued(&self) -> u64 {
        self.status().destinations.iter().map(|d| d.queued).sum()
    }

    pub fn wait_drained(&self, timeout: Duration) {
        wait_until("the spool to drain", timeout, || self.queued() == 0);
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("kakehashi"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run kakehashi")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }
}

/// DCMTK storescp in bit-preserving mode: it writes datasets exactly as
/// received. `-dhl`: no reverse DNS lookup of callers (in a namespace whose
/// default route leads nowhere, it would stall each association).
#[derive(Debug)]
pub struct StoreScp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    _child: Proc,
}

impl StoreScp {
    pub fn start(port: u16) -> StoreScp {
        StoreScp::start_in(port, &std::env::temp_dir())
    }

    /// Like [`StoreScp::start`], storing under `base` (e.g. a tmpfs).
    pub fn start_in(port: u16, base: &Path) -> StoreScp {
        StoreScp::start_ns(port, base, None)
    }

    /// Like [`StoreScp::start_in`], inside network namespace `ns`.
    pub fn start_ns(port: u16, base: &Path, ns: Option<&str>) -> StoreScp {
        StoreScp::start_as(port, base, ns, "READCENTER")
    }

    /// Like [`StoreScp::start_ns`], with AE title `aet`.
    pub fn start_as(port: u16, base: &Path, ns: Option<&str>, aet: &str) -> StoreScp {
        StoreScp::start_with(port, base, ns, aet, &[])
    }

    /// A storescp that serves many associations at once (a process per
    /// association, as a PACS does), each C-STORE taking `seconds`.
    pub fn start_forking(port: u16, seconds: u32) -> StoreScp {
        StoreScp::start_with(
            port,
            &std::env::temp_dir(),
            None,
            "READCENTER",
            &["--fork", "--sleep-during", &seconds.to_string()],
        )
    }

    /// A center that stops reading in the middle of every C-STORE for
    /// `seconds` (storescp `--sleep-during`).
    pub fn start_sleepy(port: u16, seconds: u32) -> StoreScp {
        StoreScp::start_with(
            port,
            &std::env::temp_dir(),
            None,
            "READCENTER",
            &["--sleep-during", &seconds.to_string()],
        )
    }

    /// storescp with more options (`extra`, e.g. `--fork`).
    pub fn start_with(
        port: u16,
        base: &Path,
        ns: Option<&str>,
        aet: &str,
        extra: &[&str],
    ) -> StoreScp {
        let dir = tempfile::Builder::new()
            .prefix("storescp-")
            .tempdir_in(base)
            .expect("tempdir");
        let out = dir.path().join("in");
        std::fs::create_dir_all(&out).expect("mkdir");
        let log = dir.path().join("storescp.log");
        // The children of an earlier `--fork` storescp on this port keep its
        // listening socket until their associations end: the port answers,
        // but this one cannot bind it yet. Try again until it can.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log_file = std::fs::File::create(&log).expect("log");
            let mut child = netns::ns_command(ns, "storescp")
                .args(["-v", "-dhl", "+B", "+xa", "-aet", aet])
                .args(extra)
                .arg("-od")
                .arg(&out)
                .arg(port.to_string())
                .env("TCP_NODELAY", "1")
                .stdout(log_file.try_clone().expect("log"))
                .stderr(log_file)
                .spawn()
                .expect("start storescp (apt-get install dcmtk)");
            match ns {
                Some(ns) => {
                    netns::wait_port_in(ns, &format!("127.0.0.1:{port}"), "storescp to listen")
                }
                None => wait_port(port, "storescp to listen"),
            }
            std::thread::sleep(Duration::from_millis(200));
            match child.try_wait().expect("storescp status") {
                None => {
                    return StoreScp {
                        port,
                        dir,
                        log,
                        _child: Proc(child),
                    }
                }
                Some(status) => {
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        said.contains("Address already in use") && Instant::now() < deadline,
                        "storescp on port {port} exited ({status}):\n{said}"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Stops (SIGSTOP) or continues the process: stopped, it neither reads
    /// nor answers, as a center whose host hangs; the kernel still takes
    /// what fits in its socket buffers.
    pub fn freeze(&self, frozen: bool) {
        use nix::sys::signal::{kill, Signal};
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(nix::unistd::Pid::from_raw(self._child.pid() as i32), signal)
            .expect("signal storescp");
    }

    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.dir.path().join("in"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// SOP Instance UIDs in the order they were stored (by file mtime,
    /// nanosecond resolution: storescp writes one file at a time).
    pub fn arrival_order(&self) -> Vec<String> {
        let mut arrived: Vec<(std::time::SystemTime, String)> = self
            .files()
            .iter()
            .map(|p| {
                let mtime = std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .expect("mtime");
                (mtime, sop_instance_of_file(&read(p)).expect("uid"))
            })
            .collect();
        arrived.sort();
        arrived.into_iter().map(|(_, uid)| uid).collect()
    }

    /// How many C-STORE requests it received (re-sends included).
    pub fn pid(&self) -> u32 {
        self._child.pid()
    }

    pub fn store_requests(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Received Store Request")
            .count()
    }

    /// Associations it accepted (its log's "Association Acknowledged"; a
    /// connection that negotiates nothing, such as the readiness probe, is
    /// "Received" but not acknowledged).
    pub fn associations(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Association Acknowledged")
            .count()
    }
}

/// What storescu reported, file by file.
#[derive(Debug, Default)]
pub struct StoreOutcome {
    pub acked: Vec<PathBuf>,
    pub failed: Vec<(PathBuf, String)>,
    pub output: String,
    pub success: bool,
}

/// Runs DCMTK storescu towards the box (TCP_NODELAY=1, -nh: go on after a failed store).
pub fn storescu(port: u16, calling: &str, files: &[PathBuf]) -> StoreOutcome {
    storescu_to(port, calling, "KAKEHASHI", files)
}

/// Sends `files` to `called`@127.0.0.1:`port`, each in its own transfer
/// syntax: files are grouped by syntax and each group goes in one storescu
/// run that proposes exactly that syntax (`-R` plus the matching `-x?`), so
/// DCMTK does not transcode on its side.
pub fn storescu_to(port: u16, calling: &str, called: &str, files: &[PathBuf]) -> StoreOutcome {
    storescu_at(None, "127.0.0.1", port, calling, called, files)
}

/// Like [`storescu_to`], to `host` from inside network namespace `ns`.
pub fn storescu_at(
    ns: Option<&str>,
    host: &str,
    port: u16,
    calling: &str,
    called: &str,
    files: &[PathBuf],
) -> StoreOutcome {
    storescu_with(ns, host, port, calling, called, files, &[])
}

/// storescu in the hospital's namespace to the box (`relay`) on its LAN.
pub fn send_from_hospital(site: &netns::Site, relay: &Relay, files: &[PathBuf]) -> StoreOutcome {
    storescu_at(
        Some(site.hospital.name()),
        netns::BOX_LAN_IP,
        relay.port,
        "MODALITY1",
        "KAKEHASHI",
        files,
    )
}

/// Like [`storescu_at`], with more storescu options (e.g. timeouts).
pub fn storescu_with(
    ns: Option<&str>,
    host: &str,
    port: u16,
    calling: &str,
    called: &str,
    files: &[PathBuf],
    extra: &[&str],
) -> StoreOutcome {
    let mut groups: Vec<(&'static str, Vec<PathBuf>)> = Vec::new();
    for f in files {
        let flag = propose_flag(&transfer_syntax_of_file(&read_head(f)).unwrap_or_default());
        match groups.iter_mut().find(|(g, _)| *g == flag) {
            Some((_, v)) => v.push(f.clone()),
            None => groups.push((flag, vec![f.clone()])),
        }
    }
    let mut total = StoreOutcome {
        success: true,
        ..Default::default()
    };
    for (flag, group) in groups {
        let out = netns::ns_command(ns, "storescu")
            .args([
                "-v", "-nh", "-R", flag, "-aet", calling, "-aec", called, host,
            ])
            .args(extra)
            .arg(port.to_string())
            .args(&group)
            .env("TCP_NODELAY", "1")
            .output()
            .expect("run storescu (apt-get install dcmtk)");
        let o = parse_storescu(&out);
        total.acked.extend(o.acked);
        total.failed.extend(o.failed);
        total.output += &o.output;
        total.success &= o.success;
    }
    total
}

/// The storescu option that proposes exactly this transfer syntax.
pub fn propose_flag(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        _ => "-xe",
    }
}

fn read_head(path: &Path) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut v))
        .unwrap_or(0);
    v.truncate(n);
    v
}

fn parse_storescu(out: &Output) -> StoreOutcome {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut outcome = StoreOutcome {
        success: out.status.success(),
        ..Default::default()
    };
    let mut current: Option<PathBuf> = None;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            current = Some(PathBuf::from(f.trim()));
        } else if let Some(rest) = line.strip_prefix("I: Received Store Response") {
            if let Some(f) = current.take() {
                if rest.trim() == "(Success)" {
                    outcome.acked.push(f);
                } else {
                    outcome.failed.push((f, rest.trim().to_string()));
                }
            }
        }
    }
    outcome.output = text;
    outcome
}

pub fn echoscu(port: u16, calling: &str) -> Output {
    echoscu_at(None, "127.0.0.1", port, calling, "KAKEHASHI")
}

/// C-ECHO to `called`@`host`:`port` from inside namespace `ns` (5 s timeouts).
pub fn echoscu_at(ns: Option<&str>, host: &str, port: u16, calling: &str, called: &str) -> Output {
    netns::ns_command(ns, "echoscu")
        .args([
            "-to", "5", "-ta", "5", "-aet", calling, "-aec", called, host,
        ])
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .output()
        .expect("run echoscu")
}

/// DCMTK's `dcmqrscp` as a second PACS flavour: a query/retrieve SCP over a
/// storage area filled with `files` (indexed with `dcmqridx`), knowing
/// `movers` (AE title, host, port) as move destinations. Unlike Orthanc it
/// does not return Modalities in Study.
#[derive(Debug)]
pub struct Dcmqrscp {
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    _child: Proc,
}

impl Dcmqrscp {
    /// Listens on `port` (chosen by the caller, so the box's config can
    /// name it before the box's own port is known).
    pub fn start(
        port: u16,
        ae_title: &str,
        files: &[PathBuf],
        movers: &[(&str, &str, u16)],
    ) -> Dcmqrscp {
        let dir = tempfile::Builder::new()
            .prefix("dcmqrscp-")
            .tempdir()
            .expect("tempdir");
        let db = dir.path().join("db");
        std::fs::create_dir_all(&db).expect("mkdir");
        let mut stored = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let to = db.join(format!("{i}.dcm"));
            std::fs::copy(f, &to).expect("copy into the storage area");
            stored.push(to);
        }
        if !stored.is_empty() {
            let out = Command::new("dcmqridx")
                .arg(&db)
                .args(&stored)
                .output()
                .expect("run dcmqridx (apt-get install dcmtk)");
            assert!(out.status.success(), "dcmqridx: {out:?}");
        }
        let hosts: String = movers
            .iter()
            .enumerate()
            .map(|(i, (aet, host, p))| format!("mover{i} = ({aet}, {host}, {p})\n"))
            .collect();
        let config = format!(
            "NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\
             HostTable BEGIN\n{hosts}HostTable END\nVendorTable BEGIN\nVendorTable END\n\
             AETable BEGIN\n{ae_title} {} RW (200, 1024mb) ANY\nAETable END\n",
            db.display()
        );
        let cfg = dir.path().join("dcmqrscp.cfg");
        std::fs::write(&cfg, config).expect("write dcmqrscp.cfg");
        let log = dir.path().join("dcmqrscp.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new("dcmqrscp")
            .args(["-v", "-c"])
            .arg(&cfg)
            .env("TCP_NODELAY", "1")
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start dcmqrscp (apt-get install dcmtk)");
        wait_port(port, "dcmqrscp to listen");
        Dcmqrscp {
            port,
            log,
            _dir: dir,
            _child: Proc(child),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Orthanc as a reading center, with its own storage and a loopback REST port.
#[derive(Debug)]
pub struct Orthanc {
    pub dicom_port: u16,
    pub http_port: u16,
    pub dir: tempfile::TempDir,
    netns: Option<String>,
    _child: Proc,
}

impl Orthanc {
    /// The reading center's Orthanc (AE READCENTER) on loopback.
    pub fn start() -> Orthanc {
        Orthanc::start_as(None, "READCENTER", serde_json::json!({}))
    }

    /// Orthanc with AE title `aet`, inside namespace `ns` (REST on its
    /// loopback), knowing the DICOM peers in `modalities`
    /// (`{"name": [AE, host, port]}`).
    pub fn start_as(ns: Option<&str>, aet: &str, modalities: serde_json::Value) -> Orthanc {
        Orthanc::start_on(ns, aet, free_port(), modalities)
    }

    /// Like [`Orthanc::start_as`], with DICOM on `dicom_port`.
    pub fn start_on(
        ns: Option<&str>,
        aet: &str,
        dicom_port: u16,
        modalities: serde_json::Value,
    ) -> Orthanc {
        let dir = tempfile::Builder::new()
            .prefix("orthanc-")
            .tempdir()
            .expect("tempdir");
        let http_port = free_port();
        let cfg = serde_json::json!({
            "Name": aet,
            "DicomModalities": modalities,
            "StorageDirectory": dir.path().join("db"),
            "IndexDirectory": dir.path().join("db"),
            "StorageCompression": false,
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomServerEnabled": true,
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": false,
            "DicomAlwaysAllowStore": true,
            "UnknownSopClassAccepted": true,
            "Plugins": [],
            "ConcurrentJobs": 1,
        });
        let cfg_path = dir.path().join("orthanc.json");
        std::fs::write(&cfg_path, cfg.to_string()).expect("orthanc config");
        let child = netns::ns_command(ns, "Orthanc")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("orthanc.log")).expect("log"))
            .spawn()
            .expect("start Orthanc (apt-get install orthanc)");
        let o = Orthanc {
            dicom_port,
            http_port,
            dir,
            netns: ns.map(str::to_string),
            _child: Proc(child),
        };
        wait_until("Orthanc REST API", Duration::from_secs(60), || {
            o.get("/system").is_some()
        });
        match ns {
            Some(ns) => {
                netns::wait_port_in(ns, &format!("127.0.0.1:{dicom_port}"), "Orthanc DICOM port")
            }
            None => wait_port(dicom_port, "Orthanc DICOM port"),
        }
        o
    }

    /// GET on the REST API (curl: no HTTP client in the test's dependencies).
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        self.curl(path, &[])
    }

    fn curl(&self, path: &str, extra: &[&str]) -> Option<Vec<u8>> {
        let out = netns::ns_command(self.netns.as_deref(), "curl")
            .arg("-sf")
            .args(extra)
            .arg(format!("http://127.0.0.1:{}{}", self.http_port, path))
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }

    /// PUT of a JSON body on the REST API (e.g. `/modalities/NAME`).
    pub fn put(&self, path: &str, body: &serde_json::Value) -> Option<Vec<u8>> {
        self.curl(path, &["-X", "PUT", "--data-binary", &body.to_string()])
    }

    /// Stores a DICOM file in this Orthanc (as a modality would); its instance ID.
    pub fn upload(&self, file: &Path) -> String {
        let body = format!("@{}", file.display());
        let answer = self
            .curl("/instances", &["-X", "POST", "--data-binary", &body])
            .unwrap_or_else(|| panic!("Orthanc refused {}", file.display()));
        let v: serde_json::Value = serde_json::from_slice(&answer).expect("Orthanc JSON");
        v["ID"].as_str().expect("instance ID").to_string()
    }

    /// C-STORE of `ids` to the configured modality `name` (Orthanc as SCU),
    /// waiting for the job; Orthanc's answer.
    pub fn send_to(&self, name: &str, ids: &[String]) -> Option<serde_json::Value> {
        let body = serde_json::json!({ "Resources": ids, "Synchronous": true }).to_string();
        let answer = self.curl(
            &format!("/modalities/{name}/store"),
            &["-X", "POST", "--data-binary", &body],
        )?;
        serde_json::from_slice(&answer).ok()
    }

    pub fn instance_ids(&self) -> Vec<String> {
        self.get("/instances")
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
            .unwrap_or_default()
    }

    pub fn instance_file(&self, id: &str) -> Vec<u8> {
        self.get(&format!("/instances/{id}/file"))
            .expect("instance file")
    }
}

/// Reads a whole file.
pub fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// SOP Instance UID from a Part 10 file's meta header (0002,0003).
pub fn sop_instance_of_file(bytes: &[u8]) -> Option<String> {
    meta_element(bytes, 0x0003)
}

/// Transfer Syntax UID from a Part 10 file's meta header (0002,0010).
pub fn transfer_syntax_of_file(bytes: &[u8]) -> Option<String> {
    meta_element(bytes, 0x0010)
}

fn meta_element(bytes: &[u8], wanted: u16) -> Option<String> {
    let gl = u32::from_le_bytes(bytes.get(140..144)?.try_into().ok()?) as usize;
    let meta = bytes.get(144..144 + gl)?;
    let mut pos = 0;
    while pos + 8 <= meta.len() {
        let elem = u16::from_le_bytes([meta[pos + 2], meta[pos + 3]]);
        let vr = &meta[pos + 4..pos + 6];
        let (len, hdr) = if vr == b"OB" || vr == b"UN" {
            (
                u32::from_le_bytes(meta.get(pos + 8..pos + 12)?.try_into().ok()?) as usize,
                12,
            )
        } else {
            (
                u16::from_le_bytes([meta[pos + 6], meta[pos + 7]]) as usize,
                8,
            )
        };
        if elem == wanted {
            let v = meta.get(pos + hdr..pos + hdr + len)?;
            return Some(
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\0', ' '])
                    .to_string(),
            );
        }
        pos += hdr + len;
    }
    None
}

/// aiosmtpd storing every message it accepts in a Maildir.
#[derive(Debug)]
pub struct Smtp {
    pub maildir: PathBuf,
    _proc: Proc,
}

impl Smtp {
    pub fn start(port: u16, maildir: &Path) -> Smtp {
        Smtp::start_at(None, "127.0.0.1", port, maildir)
    }

    /// In namespace `ns`, listening on `host`:`port`.
    pub fn start_at(ns: Option<&str>, host: &str, port: u16, maildir: &Path) -> Smtp {
        let proc = netns::ns_command(ns, "/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("{host}:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start aiosmtpd (apt-get install python3-aiosmtpd)");
        match ns {
            Some(ns) => netns::wait_port_in(ns, &format!("{host}:{port}"), "aiosmtpd to listen"),
            None => wait_port(port, "aiosmtpd to listen"),
        }
        Smtp {
            maildir: maildir.to_path_buf(),
            _proc: Proc(proc),
        }
    }

    /// Every message received, oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir(self.maildir.join("new"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| {
                            let t = e.metadata().and_then(|m| m.modified()).expect("mtime");
                            (t, e.path())
                        })
                        .collect()
                })
                .unwrap_or_default();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| std::fs::read_to_string(p).expect("read mail"))
            .collect()
    }
}
