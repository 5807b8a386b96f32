//! The whole path in network namespaces, with real peers:
//!
//! ```text
//!  hospital ns            box ns                         center ns
//!  storescu, Orthanc --- lan1 | kakehashid | wan0 --- wan1 | wireguard-go + storescp
//!  192.0.2.10   lan0   192.0.2.1    198.51.100.1   198.51.100.2 (center.test)
//!                                  tunnel 10.8.0.2 ====== 10.8.0.1
//! ```
//!
//! The hospital's default route points at the box, which does not forward
//! (a new namespace has ip_forward=0): the only way across is the relay.
//! The center's DICOM node listens in the center namespace and is addressed
//! by its tunnel address. The box resolves the center as `center.test`
//! through `/etc/netns/<box>/hosts`, which `ip netns exec` mounts on
//! `/etc/hosts`. Everything is torn down on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{wait_until, Proc};

pub const HOSPITAL_IP: &str = "192.0.2.10";
pub const BOX_LAN_IP: &str = "192.0.2.1";
pub const BOX_WAN_IP: &str = "198.51.100.1";
pub const CENTER_WAN_IP: &str = "198.51.100.2";
pub const CENTER_MOVED_IP: &str = "198.51.100.3";
pub const BOX_TUNNEL_IP: &str = "10.8.0.2";
pub const CENTER_TUNNEL_IP: &str = "10.8.0.1";
pub const CENTER_NAME: &str = "center.test";
/// The center's DICOM node by name, inside the tunnel.
pub const CENTER_PACS_NAME: &str = "pacs.center.test";
/// A name that resolves to the center's WAN address: a destination given
/// this name would carry patient data outside the tunnel.
pub const CENTER_WAN_NAME: &str = "wan.center.test";
pub const WG_PORT: u16 = 51820;

/// `program` run inside namespace `ns` (or here, when `None`).
pub fn ns_command(ns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Runs `f` on a thread that has entered namespace `ns` (setns affects only
/// the calling thread), e.g. to probe a port from inside.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Waits until something listens on `addr` inside namespace `ns`.
pub fn wait_port_in(ns: &str, addr: &str, what: &str) {
    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
    wait_until(what, Duration::from_secs(20), || {
        in_netns(ns, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        })
    });
}

/// A named network namespace, deleted (with every process in it) on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    fn create(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

/// hospital, box and center namespaces, wired as in the module docs, with
/// keys for both tunnel ends and the center's WireGuard (wireguard-go) up.
#[derive(Debug)]
pub struct Site {
    pub dir: tempfile::TempDir,
    pub box_interface: String,
    pub center_interface: String,
    pub box_key: PathBuf,
    pub box_public: String,
    pub center_key: PathBuf,
    pub center_public: String,
    pub center_wan_ip: String,
    /// The UDP port the box is told to reach the center on.
    pub endpoint_port: u16,
    center_wg: Option<Proc>,
    impairment: Option<Impairment>,
    // Declared last: dropped after the processes above.
    pub hospital: Netns,
    pub boxns: Netns,
    pub center: Netns,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn genkey(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = run(Command::new("wg").arg("genkey"));
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, &key).expect("write key");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey (apt-get install wireguard-tools)");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), key.as_bytes())
        .expect("feed wg pubkey");
    let out = child.wait_with_output().expect("wg pubkey");
    (
        path,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

impl Site {
    pub fn new() -> Site {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("kakehashi-site-")
            .tempdir()
            .expect("tempdir");
        let hospital = Netns::create(format!("kkh-{tag}"));
        let boxns = Netns::create(format!("kkb-{tag}"));
        let center = Netns::create(format!("kkc-{tag}"));
        let (h, b, c) = (hospital.name(), boxns.name(), center.name());
        ip(&[
            "link", "add", "lan0", "netns", h, "type", "veth", "peer", "name", "lan1", "netns", b,
        ]);
        ip(&[
            "link", "add", "wan0", "netns", b, "type", "veth", "peer", "name", "wan1", "netns", c,
        ]);
        ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{HOSPITAL_IP}/24"),
            "dev",
            "lan0",
        ]);
        ip(&["-n", h, "link", "set", "lan0", "up"]);
        ip(&["-n", h, "route", "add", "default", "via", BOX_LAN_IP]);
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("{BOX_LAN_IP}/24"),
            "dev",
            "lan1",
        ]);
        ip(&["-n", b, "link", "set", "lan1", "up"]);
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("{BOX_WAN_IP}/24"),
            "dev",
            "wan0",
        ]);
        ip(&["-n", b, "link", "set", "wan0", "up"]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{CENTER_WAN_IP}/24"),
            "dev",
            "wan1",
        ]);
        ip(&["-n", c, "link", "set", "wan1", "up"]);
        let (box_key, box_public) = genkey(dir.path(), "box");
        let (center_key, center_public) = genkey(dir.path(), "center");
        let mut site = Site {
            box_interface: format!("kkb{tag}"),
            center_interface: format!("kkc{tag}"),
            box_key,
            box_public,
            center_key,
            center_public,
            center_wan_ip: CENTER_WAN_IP.to_string(),
            endpoint_port: WG_PORT,
            center_wg: None,
            impairment: None,
            dir,
            hospital,
            boxns,
            center,
        };
        site.write_hosts();
        site.start_center_wireguard();
        site
    }

    fn write_hosts(&self) {
        let dir = PathBuf::from(format!("/etc/netns/{}", self.boxns.name()));
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns");
        // Written in place: `ip netns exec` bind-mounts this very file.
        std::fs::write(
            dir.join("hosts"),
            format!(
                "127.0.0.1 localhost\n{wan} {CENTER_NAME}\n{CENTER_TUNNEL_IP} {CENTER_PACS_NAME}\n{wan} {CENTER_WAN_NAME}\n",
                wan = self.center_wan_ip
            ),
        )
        .expect("write hosts");
    }

    /// The box's resolver (`/etc/netns/<box>/resolv.conf`, bind-mounted on
    /// `/etc/resolv.conf` by `ip netns exec`): e.g. a nameserver that never
    /// answers.
    pub fn set_box_resolver(&self, resolv_conf: &str) {
        let dir = PathBuf::from(format!("/etc/netns/{}", self.boxns.name()));
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns");
        std::fs::write(dir.join("resolv.conf"), resolv_conf).expect("write resolv.conf");
    }

    /// wireguard-go + `wg` as the reading center's hub.
    pub fn start_center_wireguard(&mut self) {
        let c = self.center.name().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("wireguard-go.log"))
            .expect("log");
        let child = ns_command(Some(&c), "wireguard-go")
            .args(["-f", &self.center_interface])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start wireguard-go (apt-get install wireguard-go)");
        self.center_wg = Some(Proc(child));
        let sock = format!("/var/run/wireguard/{}.sock", self.center_interface);
        // A SIGKILLed wireguard-go leaves its socket behind.
        let _ = std::fs::remove_file(&sock);
        wait_until("wireguard-go to start", Duration::from_secs(10), || {
            Path::new(&sock).exists()
        });
        run(ns_command(Some(&c), "wg").args([
            "set",
            &self.center_interface,
            "private-key",
            &self.center_key.display().to_string(),
            "listen-port",
            &WG_PORT.to_string(),
            "peer",
            &self.box_public,
            "allowed-ips",
            &format!("{BOX_TUNNEL_IP}/32"),
        ]));
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{CENTER_TUNNEL_IP}/24"),
            "dev",
            &self.center_interface,
        ]);
        ip(&[
            "-n",
            &c,
            "link",
            "set",
            &self.center_interface,
            "mtu",
            "1420",
            "up",
        ]);
    }

    pub fn stop_center_wireguard(&mut self) {
        self.center_wg = None;
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.center_interface));
        let c = self.center.name().to_string();
        let iface = self.center_interface.clone();
        wait_until(
            "the center interface to go",
            Duration::from_secs(10),
            || {
                !Command::new("ip")
                    .args(["-n", &c, "link", "show", &iface])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }

    /// The center now knows the box by `public` (e.g. a key `kakehashi
    /// provision` made in the TPM) instead of the generated one.
    pub fn set_box_public(&mut self, public: &str) {
        let c = self.center.name().to_string();
        run(ns_command(Some(&c), "wg").args([
            "set",
            &self.center_interface,
            "peer",
            &self.box_public,
            "remove",
        ]));
        run(ns_command(Some(&c), "wg").args([
            "set",
            &self.center_interface,
            "peer",
            public,
            "allowed-ips",
            &format!("{BOX_TUNNEL_IP}/32"),
        ]));
        self.box_public = public.to_string();
    }

    /// The center's WAN address changes, and `center.test` follows it.
    pub fn move_center(&mut self, new_ip: &str) {
        let c = self.center.name().to_string();
        ip(&[
            "-n",
            &c,
            "addr",
            "del",
            &format!("{}/24", self.center_wan_ip),
            "dev",
            "wan1",
        ]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{new_ip}/24"),
            "dev",
            "wan1",
        ]);
        self.center_wan_ip = new_ip.to_string();
        self.write_hosts();
    }

    /// The box's WAN link, down (cable pulled) or up.
    pub fn wan(&self, up: bool) {
        ip(&[
            "-n",
            self.boxns.name(),
            "link",
            "set",
            "wan0",
            if up { "up" } else { "down" },
        ]);
    }

    /// Limits the WAN link's rate in both directions (`tc tbf`).
    pub fn limit_rate(&self, rate: &str) {
        for (ns, dev) in [(self.boxns.name(), "wan0"), (self.center.name(), "wan1")] {
            run(Command::new("tc").args([
                "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                "64kb", "latency", "500ms",
            ]));
        }
    }

    pub fn clear_rate(&self) {
        for (ns, dev) in [(self.boxns.name(), "wan0"), (self.center.name(), "wan1")] {
            let _ = Command::new("tc")
                .args(["-n", ns, "qdisc", "del", "dev", dev, "root"])
                .output();
        }
    }

    /// Puts a lossy, slow stretch of internet between the box and the
    /// center's WireGuard: every UDP datagram in either direction is dropped
    /// with probability `loss` and delayed by `delay`. Call before starting
    /// the box: it is told to reach the center on the impairment's port.
    ///
    /// This is `tc netem`'s job, but the kernels of these machines are built
    /// without sch_netem (`modprobe sch_netem` fails), so it is done in
    /// userspace, inside the center namespace.
    pub fn impair(&mut self, loss: f64, delay: Duration) {
        let port = WG_PORT + 1000;
        let front: std::net::SocketAddr = format!("{}:{port}", self.center_wan_ip)
            .parse()
            .expect("addr");
        let back: std::net::SocketAddr = format!("127.0.0.1:{WG_PORT}").parse().expect("addr");
        self.impairment = Some(in_netns(self.center.name(), || {
            Impairment::start(front, back, loss, delay)
        }));
        self.endpoint_port = port;
    }

    /// The box's `[tunnel]` section.
    pub fn tunnel_toml(&self, center_public: &str, handshake_timeout: &str) -> String {
        format!(
            "[tunnel]\ninterface = \"{}\"\nprivate_key_file = \"{}\"\naddress = [\"{BOX_TUNNEL_IP}/24\"]\nlisten_port = 0\nhandshake_timeout = \"{handshake_timeout}\"\n\n[tunnel.peer]\npublic_key = \"{center_public}\"\nendpoint = \"{CENTER_NAME}:{}\"\nallowed_ips = [\"10.8.0.0/24\"]\n",
            self.box_interface,
            self.box_key.display(),
            self.endpoint_port
        )
    }

    /// `wg show` of one end, as its operator would see it.
    pub fn wg_show(&self, on_box: bool) -> String {
        let (ns, iface) = if on_box {
            (self.boxns.name(), &self.box_interface)
        } else {
            (self.center.name(), &self.center_interface)
        };
        run(ns_command(Some(ns), "wg").args(["show", iface]))
    }
}

impl Default for Site {
    fn default() -> Self {
        Site::new()
    }
}

/// A UDP relay that drops and delays datagrams (see [`Site::impair`]).
#[derive(Debug)]
pub struct Impairment {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Impairment {
    /// Relays between the box (whoever sends to `front`) and `back`.
    /// The sockets are created in the calling thread's network namespace.
    pub fn start(
        front: std::net::SocketAddr,
        back: std::net::SocketAddr,
        loss: f64,
        delay: Duration,
    ) -> Impairment {
        use std::net::UdpSocket;
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let outside = Arc::new(UdpSocket::bind(front).expect("bind impairment front"));
        let inside = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind impairment back"));
        inside.connect(back).expect("connect impairment back");
        let box_addr: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        for towards_center in [true, false] {
            let (from, to) = if towards_center {
                (Arc::clone(&outside), Arc::clone(&inside))
            } else {
                (Arc::clone(&inside), Arc::clone(&outside))
            };
            from.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
            let stop_rx = Arc::clone(&stop);
            let peer = Arc::clone(&box_addr);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop_rx.load(Ordering::Relaxed) {
                    let Ok((n, src)) = from.recv_from(&mut buf) else {
                        continue;
                    };
                    if towards_center {
                        *peer.lock().expect("lock") = Some(src);
                    }
                    if fastrand::f64() >= loss {
                        let _ = tx.send((std::time::Instant::now() + delay, buf[..n].to_vec()));
                    }
                }
            });
            let peer = Arc::clone(&box_addr);
            std::thread::spawn(move || {
                // Constant delay keeps the queue in order.
                for (due, packet) in rx {
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                    if towards_center {
                        let _ = to.send(&packet);
                    } else if let Some(a) = *peer.lock().expect("lock") {
                        let _ = to.send_to(&packet, a);
                    }
                }
            });
        }
        Impairment { stop }
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // A SIGKILLed daemon leaves its control socket behind.
        for iface in [&self.box_interface, &self.center_interface] {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
        }
    }
}
