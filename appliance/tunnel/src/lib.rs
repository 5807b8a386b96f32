//! The box's WireGuard tunnel to the reading center.
//!
//! kakehashid brings the interface up in-process with boringtun 0.7's device
//! (a TUN device and its worker threads), configures it through the UAPI
//! protocol over a private socket pair (so nothing else can reconfigure it),
//! and serves the standard UAPI socket `/var/run/wireguard/<iface>.sock`
//! itself, with boringtun's answers corrected, so that `wg show` on the box
//! tells the truth (see [`uapi`]). `wg set` is refused there: the site config
//! is the only source of the tunnel's settings, and boringtun 0.7 panics when
//! an existing peer is modified.
//!
//! Addresses, MTU and routes are set with iproute2's `ip`, as `wg-quick` does.
//! [`supervise`] keeps the tunnel alive; what it decides is [`watch::Watch`],
//! plain logic on an injected clock.

#![forbid(unsafe_code)]

pub mod key;
mod link;
mod server;
mod supervisor;
pub mod uapi;
pub mod watch;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boringtun::device::{DeviceConfig, DeviceHandle};
use kakehashi_config::TunnelConfig;

pub use key::PrivateKey;
pub use supervisor::{supervise, Health};

/// Where `wg` looks for a userspace interface's control socket.
pub const UAPI_DIR: &str = "/var/run/wireguard";

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel.private_key_file {path}: {problem}")]
    Key { path: PathBuf, problem: String },
    #[error("cannot create the WireGuard interface {interface}: {message}")]
    Device { interface: String, message: String },
    #[error("cannot configure interface {interface}: `{command}` failed: {message}")]
    Link {
        interface: String,
        command: String,
        message: String,
    },
    #[error("WireGuard device {interface}: {message}")]
    Uapi { interface: String, message: String },
}

/// A running WireGuard interface. Dropping it takes the interface down.
pub struct Tunnel {
    config: TunnelConfig,
    key: PrivateKey,
    peer_hex: String,
    control: Mutex<BufReader<UnixStream>>,
    device: Mutex<Option<DeviceHandle>>,
    started: Instant,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("interface", &self.config.interface)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Creates the interface (or attaches to it, when the system made it:
    /// `link_by_system`), gives it its key, port and peer, and its
    /// addresses, MTU and routes unless the system did. `endpoint` is the
    /// peer's resolved address, if it resolved.
    pub fn start(
        config: TunnelConfig,
        key: PrivateKey,
        endpoint: Option<SocketAddr>,
    ) -> Result<Tunnel, TunnelError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| TunnelError::Device {
            interface: config.interface.clone(),
            message: format!("socket pair: {e}"),
        })?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .and_then(|()| ours.set_write_timeout(Some(Duration::from_secs(10))))
            .map_err(|e| TunnelError::Device {
                interface: config.interface.clone(),
                message: format!("socket pair: {e}"),
            })?;
        let device = DeviceHandle::new(
            &config.interface,
            DeviceConfig {
                n_threads: 2,
                use_connected_socket: true,
                use_multi_queue: false,
                // boringtun owns this end from here on and closes it.
                uapi_fd: theirs.into_raw_fd(),
            },
        )
        .map_err(|e| TunnelError::Device {
            interface: config.interface.clone(),
            message: if config.link_by_system {
                format!("{e} (the system makes it from the config's [network]: it must exist as a multi-queue tun owned by the service user; see `networkctl status {}`)", config.interface)
            } else {
                format!("{e} (kakehashid needs CAP_NET_ADMIN and access to /dev/net/tun)")
            },
        })?;
        let tunnel = Tunnel {
            peer_hex: hex::encode(config.peer.public_key),
            config,
            key,
            control: Mutex::new(BufReader::new(ours)),
            device: Mutex::new(Some(device)),
            started: Instant::now(),
        };
        let mut set = zeroize::Zeroizing::new(format!(
            "private_key={}\nlisten_port={}\nreplace_peers=true\n",
            *tunnel.key.to_hex(),
            tunnel.config.listen_port
        ));
        set.push_str(&tunnel.peer_section(endpoint));
        tunnel.set(&set)?;
        if !tunnel.config.link_by_system {
            link::configure(&tunnel.config)?;
        }
        Ok(tunnel)
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.config
    }

    pub fn interface(&self) -> &str {
        &self.config.interface
    }

    /// The box's public key, base64.
    pub fn public_key(&self) -> String {
        key::encode(&self.key.public_key())
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    fn peer_section(&self, endpoint: Option<SocketAddr>) -> String {
        let p = &self.config.peer;
        let mut s = format!(
            "public_key={}\nreplace_allowed_ips=true\npersistent_keepalive_interval={}\n",
            self.peer_hex,
            p.persistent_keepalive.as_secs()
        );
        if let Some(e) = endpoint {
            s.push_str(&format!("endpoint={e}\n"));
        }
        for net in &p.allowed_ips {
            s.push_str(&format!("allowed_ip={}\n", link::network(net)));
        }
        s
    }

    /// Replaces the peer (boringtun 0.7 cannot modify one in place): its
    /// session is dropped and the next packet starts a fresh handshake.
    pub fn reapply_peer(&self, endpoint: Option<SocketAddr>) -> Result<(), TunnelError> {
        // Two transactions: boringtun does not reset `remove` between peers.
        self.set(&format!("public_key={}\nremove=true\n", self.peer_hex))?;
        self.set(&self.peer_section(endpoint))
    }

    /// The device's state, read from boringtun.
    pub fn dump(&self) -> Result<uapi::DeviceDump, TunnelError> {
        let text = self.transact("get=1\n\n")?;
        uapi::parse_get(&text).map_err(|message| self.uapi_error(message))
    }

    /// The configured peer's part of [`Tunnel::dump`].
    pub fn peer(&self) -> Result<uapi::PeerDump, TunnelError> {
        self.dump()?
            .peers
            .into_iter()
            .find(|p| p.public_key_hex == self.peer_hex)
            .ok_or_else(|| self.uapi_error("the configured peer is missing".into()))
    }

    fn set(&self, body: &str) -> Result<(), TunnelError> {
        let request = zeroize::Zeroizing::new(format!("set=1\n{body}\n"));
        self.transact(&request).map(drop)
    }

    fn uapi_error(&self, message: String) -> TunnelError {
        TunnelError::Uapi {
            interface: self.config.interface.clone(),
            message,
        }
    }

    /// One request, one answer; answers end with `errno=N` and an empty line.
    fn transact(&self, request: &str) -> Result<String, TunnelError> {
        let mut control = self
            .control
            .lock()
            .map_err(|_| self.uapi_error("control lock poisoned".into()))?;
        let io = |e: std::io::Error| self.uapi_error(format!("control socket: {e}"));
        control
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(io)?;
        let mut answer = String::new();
        loop {
            let mut line = String::new();
            if control.read_line(&mut line).map_err(io)? == 0 {
                return Err(self.uapi_error("the device stopped".into()));
            }
            if let Some(errno) = line.strip_prefix("errno=") {
                let mut blank = String::new();
                control.read_line(&mut blank).map_err(io)?;
                return match errno.trim() {
                    "0" => Ok(answer),
                    n => Err(self.uapi_error(format!(
                        "boringtun refused the request (errno {n}: {})",
                        std::io::Error::from_raw_os_error(n.parse().unwrap_or(5))
                    ))),
                };
            }
            answer.push_str(&line);
        }
    }

    /// Takes the interface down (also done on drop).
    pub fn stop(&self) {
        if let Ok(mut d) = self.device.lock() {
            d.take();
        }
    }
}

/// The longest a resolution of the endpoint may take: a resolver that does
/// not answer during a WAN outage must not stall the supervisor (and with
/// it the systemd watchdog).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves `host:port` within [`RESOLVE_TIMEOUT`], preferring IPv4 (the
/// tunnel's usual underlay).
pub async fn resolve(endpoint: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(endpoint))
            .await
            .map_err(|_| {
                format!(
                    "cannot resolve {endpoint}: no answer from the resolver within {} s",
                    RESOLVE_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("cannot resolve {endpoint}: {e}"))?
            .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{endpoint} resolves to no address"))
}

/// An address inside the tunnel to send a probe to: a packet routed into the
/// interface makes boringtun start a handshake if it has no session.
pub fn probe_target(config: &TunnelConfig) -> Option<IpAddr> {
    let net = config.peer.allowed_ips.first()?;
    let base = link::network(net);
    Some(match base.addr() {
        IpAddr::V4(a) if base.prefix() < 31 => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) if base.prefix() < 127 => IpAddr::V6((u128::from(a) + 1).into()),
        other => other,
    })
}

pub use server::serve_uapi;
