//! Site configuration of a Kakehashi box.
//!
//! The file is TOML (`/etc/kakehashi/kakehashi.toml` by default). It is read
//! strictly — an unknown key is an error that names it — and validated once,
//! at load, into typed values ([`Config`]); the rest of the box never sees a
//! raw string from the file. Every validation error names the key, the bad
//! value and what would be accepted.
//!
//! [`site`] turns a field engineer's site file into a config.
//!
//! Not here: hot reload (the daemon reads
//! its config once at start; restart it to apply changes).

#![forbid(unsafe_code)]

mod raw;
pub mod site;
mod units;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use units::{format_bytes, parse_bytes, parse_duration};

/// Default path of the site configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kakehashi/kakehashi.toml";
/// Default path of the operator control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/kakehashi/control.sock";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}` = {value:?} is not valid: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
}

impl ConfigError {
    fn invalid(
        key: impl Into<String>,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }
}

/// The validated configuration of the box.
#[derive(Debug, Clone)]
pub struct Config {
    pub dicom: DicomConfig,
    pub destinations: Vec<Destination>,
    pub spool: SpoolConfig,
    pub retry: RetryPolicy,
    pub control: ControlConfig,
    pub log: LogConfig,
    pub audit: AuditConfig,
    /// The appliance image's network interfaces. With it, the system (the
    /// image's kakehashi-render and systemd-networkd) also creates and
    /// configures the tunnel's interface; kakehashid only attaches to it.
    pub network: Option<NetworkConfig>,
    /// The WireGuard tunnel to the reading center, if the box keeps one.
    pub tunnel: Option<TunnelConfig>,
    /// Where the box's identity and sealed secrets live.
    pub tpm: Option<TpmConfig>,
    /// The hospital's PACS (`[pacs]`): receives the reports the reading
    /// center sends back. Its forwarder is a destination named
    /// [`PACS_DESTINATION`], reached directly (never through the tunnel)
    /// unless `route = "tunnel"`.
    pub pacs: Option<Destination>,
    /// Where the reading center sends results (`[results]`).
    pub results: Option<ResultsConfig>,
    /// Prefetching prior studies from `[pacs]` (`[priors]`).
    pub priors: Option<PriorsConfig>,
    /// Escalating urgent results (`[urgent]`).
    pub urgent: Option<UrgentConfig>,
    /// The Prometheus endpoint (`[metrics]`), off without it.
    pub metrics: Option<MetricsConfig>,
}

/// Where the Prometheus text endpoint (`GET /metrics`) listens: on the
/// hospital side only (see the validation of `metrics.listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
}

/// Urgent results (sent by the center with C-STORE priority HIGH): who is
/// told, how, and when to tell again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrgentConfig {
    /// Not acknowledged after this long: notify again, and the escalation
    /// list too; then again after each further period.
    pub ack_within: Duration,
    /// A result is also urgent when its SR holds one of these coded
    /// values (`SCHEME:VALUE`, e.g. `SCT:36118008`), whatever its priority.
    pub codes: Vec<String>,
    /// At least one channel: e-mail, HL7 or both.
    pub email: Option<EmailConfig>,
    pub hl7: Option<Hl7Config>,
}

/// HL7 v2 ORU^R01 over MLLP to the hospital's RIS; its ACK (AA)
/// acknowledges the finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hl7Config {
    /// `host:port` of the RIS's MLLP listener.
    pub ris: String,
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    /// For one message and its ACK.
    pub timeout: Duration,
}

/// E-mail through the hospital's SMTP relay (plain SMTP on the LAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailConfig {
    /// `host:port` of the relay.
    pub relay: String,
    pub from: String,
    /// The referring department's list.
    pub to: Vec<String>,
    /// Added from the first reminder on.
    pub escalate_to: Vec<String>,
    pub timeout: Duration,
}

/// Which prior studies go to the reading center with a new study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorsConfig {
    /// The N most recent prior studies of the same patient.
    pub max_studies: usize,
    /// Older studies (by Study Date) are not fetched.
    pub max_age: Duration,
    /// A new study is complete after this long without a new instance.
    pub stable_after: Duration,
    /// Only priors with a modality of the new study's.
    pub same_modality: bool,
    /// Only priors with a body part of the new study's (when both say).
    pub same_body_part: bool,
    /// `priors.retrieve = "get"`: C-GET instead of C-MOVE (a PACS that
    /// cannot be told of the box as a move destination).
    pub get: bool,
}

/// Name of the destination that carries results to `[pacs]` (in `status`,
/// the audit trail and the spool's routes). No `[[destinations]]` may use it.
pub const PACS_DESTINATION: &str = "pacs";

/// Storage SOP classes `[results]` accepts unless the config adds more:
/// Encapsulated PDF, Basic Text / Enhanced / Comprehensive / Comprehensive 3D
/// SR, Key Object Selection.
pub const RESULT_SOP_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.104.1", "Encapsulated PDF"),
    ("1.2.840.10008.5.1.4.1.1.88.11", "Basic Text SR"),
    ("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR"),
    ("1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR"),
    ("1.2.840.10008.5.1.4.1.1.88.34", "Comprehensive 3D SR"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "Key Object Selection"),
];

/// The results SCP (`[results]`): the reading center's reports come back
/// here and are delivered to `[pacs]`.
#[derive(Debug, Clone)]
pub struct ResultsConfig {
    /// On a real box, the tunnel address: results come only from the center.
    pub listen: SocketAddr,
    /// Called AE title the center must use (default: `dicom.ae_title`).
    pub ae_title: AeTitle,
    /// Calling AE titles allowed to send results.
    pub from: Vec<AeTitle>,
    /// Storage SOP classes accepted: [`RESULT_SOP_CLASSES`] and
    /// `results.extra_sop_classes`.
    pub sop_classes: Vec<String>,
    /// `results.trusted_signers`: each file (path, contents as read when the
    /// config was loaded) holds certificates a signed result's signer must
    /// be, or be issued by. Empty: any signature that verifies is accepted
    /// (it proves the report unchanged, not who signed it).
    pub trusted_signers: Vec<(PathBuf, Vec<u8>)>,
    /// `results.require_signature`: an unsigned result is held.
    pub require_signature: bool,
    /// `results.queries` (default true): the center may C-FIND and C-MOVE
    /// here; the box asks `[pacs]` itself, only for patients it relayed.
    pub queries: bool,
    /// `[results.hl7]`: every routine result is also an HL7 ORU^R01
    /// (abnormal flag N) to the RIS, repeated until its ACK AA.
    pub hl7: Option<Hl7Config>,
}

/// The key store (`[tpm]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmConfig {
    pub backend: KeyBackend,
    /// Directory of the identity blob and sealed secrets (mode 0700).
    pub key_dir: PathBuf,
    /// PCRs (SHA-256 bank) the sealed keys are bound to when provisioned:
    /// they unseal only while those PCRs hold the values they held then.
    pub pcrs: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBackend {
    /// A TPM 2.0 through a TCTI string: `device:/dev/tpmrm0` on a box,
    /// `swtpm:host=127.0.0.1,port=2321` in tests.
    Tpm { tcti: String },
    /// Keys in files, protected only by file permissions. For development
    /// and CI machines without a TPM; warned about at every start and in status.
    Software,
}

/// The WireGuard interface kakehashid brings up (`[tunnel]`).
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Network interface name (1–15 characters).
    pub interface: String,
    /// File holding the box's private key as `wg genkey` writes it (base64).
    /// Must be mode 0600 and owned by the user kakehashid runs as. `None`:
    /// the key is sealed by the TPM (`[tpm]`, made by `kakehashi provision`).
    /// A key file is for development; a provisioned box has none.
    pub private_key_file: Option<PathBuf>,
    /// The box's addresses inside the tunnel, with prefix (`10.8.0.2/24`).
    pub addresses: Vec<IpNet>,
    /// UDP port the box listens on; 0 lets the kernel choose.
    pub listen_port: u16,
    pub mtu: u32,
    /// A handshake older than this makes the supervisor re-resolve the
    /// endpoint and re-apply the peer.
    pub handshake_timeout: Duration,
    pub peer: TunnelPeer,
    /// The interface exists already, with its addresses, MTU and routes,
    /// made by the system (the appliance image, when `[network]` is set):
    /// kakehashid attaches to it and needs no privilege. Otherwise
    /// kakehashid creates and configures it (CAP_NET_ADMIN).
    pub link_by_system: bool,
}

/// The reading center's WireGuard peer (`[tunnel.peer]`).
#[derive(Debug, Clone)]
pub struct TunnelPeer {
    pub public_key: [u8; 32],
    /// `host:port`; the host may be a DNS name, re-resolved by the supervisor.
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    /// Zero turns persistent keepalive off.
    pub persistent_keepalive: Duration,
}

impl Destination {
    /// For a destination reached through the tunnel: why connecting to the
    /// addresses its name resolved to would leave the tunnel, if any does.
    /// (A literal address is checked at load; a name can point anywhere.)
    pub fn leaves_tunnel(
        &self,
        tunnel: Option<&TunnelConfig>,
        resolved: &[IpAddr],
    ) -> Option<String> {
        let t = tunnel.filter(|_| self.via_tunnel)?;
        let outside: Vec<String> = resolved
            .iter()
            .filter(|ip| !t.routes(**ip))
            .map(|ip| ip.to_string())
            .collect();
        (!outside.is_empty()).then(|| {
            format!(
                "refused to connect: {} resolves to {} outside the tunnel (tunnel.peer.allowed_ips {}); patient data must not leave the tunnel: fix the name, or set route = \"direct\" if this destination is meant to be reached without it",
                self.address,
                outside.join(", "),
                t.peer
                    .allowed_ips
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

impl TunnelConfig {
    /// Whether packets to `ip` are routed into the tunnel.
    pub fn routes(&self, ip: IpAddr) -> bool {
        self.peer.allowed_ips.iter().any(|n| n.contains(ip))
    }
}

/// The box's own DICOM node (the SCP the hospital sends to).
#[derive(Debug, Clone)]
pub struct DicomConfig {
    pub ae_title: AeTitle,
    pub listen: SocketAddr,
    /// Largest P-DATA PDU the box accepts (we announce it in A-ASSOCIATE-AC).
    pub max_pdu: u32,
    /// Associations served at once; more are rejected (transient, local limit).
    pub max_associations: usize,
    /// How long an association may stay silent before it is aborted.
    pub idle_timeout: Duration,
    pub sources: Vec<Source>,
}

/// A node allowed to send to the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub ae_title: AeTitle,
    pub address: Option<IpNet>,
    /// The source's own DICOM port, if it answers C-ECHO (`kakehashi selftest`).
    pub port: Option<u16>,
    /// Everything from this source is forwarded as C-STORE priority HIGH
    /// (e.g. an emergency department CT), whatever priority it was sent with.
    pub high_priority: bool,
}

/// Where studies are forwarded.
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    pub ae_title: AeTitle,
    /// `host:port`; the host may be a DNS name, resolved at each connection.
    pub address: String,
    /// Calling AE title the box uses towards this destination.
    pub calling_ae_title: AeTitle,
    pub max_pdu: u32,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Keep an association open this long waiting for more work.
    pub linger: Duration,
    /// Associations opened in parallel (at most; fewer while the
    /// destination refuses more).
    pub associations: usize,
    /// The destination is reached through the WireGuard tunnel: it is paused
    /// while the tunnel is down, and its address must lie in the tunnel.
    pub via_tunnel: bool,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_size: u64,
    /// Refuse new instances when the filesystem has less free space than this.
    pub min_free: u64,
    /// Keep delivered payloads this long (zero: delete on delivery).
    pub retention: Duration,
}

/// Exponential backoff with full jitter between `initial` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// An instance still refused with transient statuses after this many
    /// attempts, or this long after it arrived, is flagged *stuck*: shown
    /// in `status`, audited once, and the operator may dead-letter it. It is
    /// still retried: a transient status never dead-letters by itself.
    pub stuck_after_attempts: u32,
    pub stuck_after: Duration,
}

/// The box's two ports (`[network]`), as the appliance image applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The hospital side.
    pub lan: Port,
    /// The internet side (towards the reading center's WireGuard endpoint).
    pub wan: Port,
    /// Name servers (empty: those DHCP gives).
    pub dns: Vec<IpAddr>,
    /// NTP servers (empty: those DHCP gives, else Debian's pool).
    pub ntp: Vec<String>,
}

/// One network port of the box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Kernel interface name (`enp1s0`).
    pub interface: String,
    /// `None`: DHCP.
    pub address: Option<IpNet>,
    pub gateway: Option<IpAddr>,
}

/// How much of the audit trail the spool's index keeps (`[audit]`). Older
/// records, and the oldest beyond `max_records`, are first appended to a
/// JSON-lines file in `dir`, then removed from the index.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub keep: Duration,
    pub max_records: u64,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when started by systemd, text otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// A DICOM application entity title: 1–16 characters of the default
/// character repertoire, no backslash, not only spaces. Stored trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AeTitle(String);

impl AeTitle {
    pub fn parse(key: &str, value: &str) -> Result<Self, ConfigError> {
        let expected = "1 to 16 printable ASCII characters, no backslash, not only spaces";
        let trimmed = value.trim_matches(' ');
        if trimmed.is_empty()
            || value.len() > 16
            || !value
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            return Err(ConfigError::invalid(key, value, expected));
        }
        Ok(AeTitle(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AeTitle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IP network (an address is a /32 or /128 network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(key: &str, value: &str) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::invalid(
                key,
                value,
                "an IP address or CIDR network such as \"192.168.10.20\" or \"192.168.10.0/24\"",
            )
        };
        let (addr, prefix) = match value.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (value, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network. IPv4-mapped IPv6 peers match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        raw.validate()
    }

    /// A `[[destinations]]` entry, or `[pacs]` by its name `pacs`.
    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations
            .iter()
            .chain(&self.pacs)
            .find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests;
