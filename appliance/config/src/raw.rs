//! The file as written, before validation. Every struct denies unknown keys.

use serde::Deserialize;

use crate::units::{parse_bytes, parse_duration};
use crate::{
    AeTitle, AuditConfig, Config, ConfigError, ControlConfig, Destination, DicomConfig,
    EmailConfig, Hl7Config, IpNet, KeyBackend, LogConfig, LogFormat, MetricsConfig, NetworkConfig,
    Port, PriorsConfig, ResultsConfig, RetryPolicy, Source, SpoolConfig, TpmConfig, TunnelConfig,
    TunnelPeer, UrgentConfig, DEFAULT_CONTROL_SOCKET, PACS_DESTINATION, RESULT_SOP_CLASSES,
};
use base64::Engine as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const DURATION: &str = "a duration such as \"250ms\", \"30s\", \"5m\", \"2h\" or \"7d\"";
const SIZE: &str = "a size such as \"500 MiB\", \"50 GiB\" or a number of bytes";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    dicom: RawDicom,
    #[serde(default)]
    destinations: Vec<RawDestination>,
    spool: RawSpool,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    audit: RawAudit,
    network: Option<RawNetwork>,
    tunnel: Option<RawTunnel>,
    tpm: Option<RawTpm>,
    pacs: Option<RawPacs>,
    results: Option<RawResults>,
    priors: Option<RawPriors>,
    urgent: Option<RawUrgent>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

impl RawMetrics {
    /// Never on the WAN: not an address the tunnel carries or has, not
    /// the WAN port's, and not every address when a tunnel exists and no
    /// firewall of ours (`[network]`) keeps the port to the LAN.
    fn validate(
        self,
        tunnel: Option<&TunnelConfig>,
        network: Option<&NetworkConfig>,
        dicom: &DicomConfig,
    ) -> Result<MetricsConfig, ConfigError> {
        let bad = |why: &str| ConfigError::invalid("metrics.listen", &self.listen, why);
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            bad("an IP address and port on the hospital side, e.g. \"192.168.1.20:9102\" (never the WAN or the tunnel)")
        })?;
        let ip = listen.ip();
        if listen.port() == 0 || listen == dicom.listen {
            return Err(bad("a port of its own (not 0, not dicom.listen's)"));
        }
        if let Some(t) = tunnel {
            if t.routes(ip) || t.addresses.iter().any(|a| a.addr() == ip) {
                return Err(bad("an address on the hospital side: this one is the tunnel's, and metrics never go to the reading center or the internet"));
            }
            if ip.is_unspecified() && network.is_none() {
                return Err(bad("the hospital-side address: every address includes the tunnel's (on the appliance, with [network], its firewall keeps the port to the LAN)"));
            }
        }
        if let Some(wan) = network.and_then(|n| n.wan.address) {
            if wan.addr() == ip {
                return Err(bad("an address on the LAN port: this one is network.wan's"));
            }
        }
        Ok(MetricsConfig { listen })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUrgent {
    ack_within: Option<String>,
    #[serde(default)]
    codes: Vec<String>,
    email: Option<RawEmail>,
    hl7: Option<RawHl7>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHl7 {
    ris: String,
    sending_application: Option<String>,
    sending_facility: Option<String>,
    receiving_application: Option<String>,
    receiving_facility: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    relay: String,
    from: String,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    escalate_to: Vec<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPriors {
    #[serde(default)]
    same_modality: bool,
    #[serde(default)]
    same_body_part: bool,
    max_studies: Option<i64>,
    max_age: Option<String>,
    stable_after: Option<String>,
    retrieve: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacs {
    ae_title: String,
    address: String,
    calling_ae_title: Option<String>,
    max_pdu: Option<i64>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    linger: Option<String>,
    associations: Option<i64>,
    route: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResults {
    listen: String,
    ae_title: Option<String>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    extra_sop_classes: Vec<String>,
    #[serde(default)]
    trusted_signers: Vec<String>,
    #[serde(default)]
    require_signature: bool,
    queries: Option<bool>,
    hl7: Option<RawHl7>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
    backend: Option<String>,
    tcti: Option<String>,
    key_dir: Option<String>,
    #[serde(default)]
    pcrs: Vec<i64>,
}

impl RawTpm {
    fn validate(self) -> Result<TpmConfig, ConfigError> {
        let backend = match self.backend.as_deref().unwrap_or("tpm") {
            "tpm" => {
                let tcti = self.tcti.unwrap_or_else(|| "device:/dev/tpmrm0".to_string());
                let ok = ["device:", "swtpm:", "mssim:", "tabrmd"]
                    .iter()
                    .any(|p| tcti.starts_with(p));
                if !ok {
                    return Err(ConfigError::invalid(
                        "tpm.tcti",
                        &tcti,
                        "a TCTI such as \"device:/dev/tpmrm0\" or \"swtpm:host=127.0.0.1,port=2321\"",
                    ));
                }
                KeyBackend::Tpm { tcti }
            }
            "software" => {
                if let Some(t) = self.tcti {
                    return Err(ConfigError::invalid(
                        "tpm.tcti",
                        t,
                        "no tcti with backend = \"software\"",
                    ));
                }
                KeyBackend::Software
            }
            other => {
                return Err(ConfigError::invalid(
                    "tpm.backend",
                    other,
                    "\"tpm\" (the default) or \"software\" (development only: keys protected by file permissions alone)",
                ))
            }
        };
        let key_dir = self
            .key_dir
            .unwrap_or_else(|| "/var/lib/kakehashi/keys".to_string());
        if !key_dir.starts_with('/') {
            return Err(ConfigError::invalid(
                "tpm.key_dir",
                &key_dir,
                "an absolute directory path",
            ));
        }
        let mut pcrs = Vec::new();
        for (i, p) in self.pcrs.iter().enumerate() {
            if !(0..=23).contains(p) || pcrs.contains(&(*p as u8)) {
                return Err(ConfigError::invalid(
                    format!("tpm.pcrs[{i}]"),
                    p.to_string(),
                    "a PCR index from 0 to 23, each once (e.g. [0, 2, 4, 7]: firmware, option ROMs, boot loader, Secure Boot state)",
                ));
            }
            pcrs.push(*p as u8);
        }
        if !pcrs.is_empty() && backend == KeyBackend::Software {
            return Err(ConfigError::invalid(
                "tpm.pcrs",
                format!("{pcrs:?}"),
                "no PCRs with backend = \"software\" (there is no TPM to bind to)",
            ));
        }
        Ok(TpmConfig {
            backend,
            key_dir: PathBuf::from(key_dir),
            pcrs,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    interface: Option<String>,
    private_key_file: Option<String>,
    address: Vec<String>,
    listen_port: Option<i64>,
    mtu: Option<i64>,
    handshake_timeout: Option<String>,
    peer: RawPeer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    public_key: String,
    endpoint: String,
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDicom {
    ae_title: String,
    listen: String,
    max_pdu: Option<i64>,
    max_associations: Option<i64>,
    idle_timeout: Option<String>,
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    ae_title: String,
    address: Option<String>,
    port: Option<u16>,
    priority: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    name: String,
    ae_title: String,
    address: String,
    calling_ae_title: Option<String>,
    max_pdu: Option<i64>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    linger: Option<String>,
    associations: Option<i64>,
    route: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    dir: String,
    max_size: String,
    min_free: Option<String>,
    retention: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial: Option<String>,
    max: Option<String>,
    stuck_after_attempts: Option<i64>,
    stuck_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    lan: RawPort,
    wan: RawPort,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    ntp: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    interface: String,
    address: String,
    gateway: Option<String>,
}

impl RawPort {
    fn validate(self, side: &str, other: Option<&str>) -> Result<Port, ConfigError> {
        let key = |k: &str| format!("network.{side}.{k}");
        if !interface_name_ok(&self.interface) {
            return Err(ConfigError::invalid(
                key("interface"),
                &self.interface,
                "a kernel interface name of 1 to 15 characters (e.g. \"enp1s0\"; `ip link` on the box lists them)",
            ));
        }
        if other == Some(self.interface.as_str()) {
            return Err(ConfigError::invalid(
                key("interface"),
                &self.interface,
                "another port than network.lan's (the LAN and the WAN are separate ports)",
            ));
        }
        let address = match self.address.as_str() {
            "dhcp" => None,
            a => {
                let net = IpNet::parse(&key("address"), a)?;
                if a.split_once('/').is_none() {
                    return Err(ConfigError::invalid(
                        key("address"),
                        a,
                        "\"dhcp\", or an address with its prefix length, e.g. \"192.168.10.5/24\"",
                    ));
                }
                Some(net)
            }
        };
        let gateway = self
            .gateway
            .as_deref()
            .map(|g| {
                g.parse::<std::net::IpAddr>()
                    .map_err(|_| ConfigError::invalid(key("gateway"), g, "an IP address"))
            })
            .transpose()?;
        Ok(Port {
            interface: self.interface,
            address,
            gateway,
        })
    }
}

fn interface_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl RawNetwork {
    fn validate(self) -> Result<NetworkConfig, ConfigError> {
        let lan = self.lan.validate("lan", None)?;
        let wan = self.wan.validate("wan", Some(&lan.interface))?;
        let dns = self
            .dns
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.parse::<std::net::IpAddr>().map_err(|_| {
                    ConfigError::invalid(format!("network.dns[{i}]"), d, "an IP address")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, n) in self.ntp.iter().enumerate() {
            if n.is_empty() || n.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    format!("network.ntp[{i}]"),
                    n,
                    "an NTP server's name or address",
                ));
            }
        }
        Ok(NetworkConfig {
            lan,
            wan,
            dns,
            ntp: self.ntp,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: Option<String>,
    keep: Option<String>,
    max_records: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

/// Validates one forwarding target (`[[destinations]]` or `[pacs]`); `key`
/// is the prefix error messages name.
fn destination(
    key: &str,
    r: RawDestination,
    own_ae: &AeTitle,
    tunnel: Option<&TunnelConfig>,
) -> Result<Destination, ConfigError> {
    let key = |k: &str| format!("{key}.{k}");
    if !host_port_ok(&r.address) {
        return Err(ConfigError::invalid(
            key("address"),
            &r.address,
            "host:port, e.g. \"10.8.0.1:104\" or \"pacs.center.example:11112\"",
        ));
    }
    let via_tunnel = match (r.route.as_deref(), tunnel) {
        (None, t) => t.is_some(),
        (Some("tunnel"), Some(_)) => true,
        (Some("tunnel"), None) => {
            return Err(ConfigError::invalid(
                key("route"),
                "tunnel",
                "\"direct\" (there is no [tunnel] section), or add a [tunnel] section",
            ))
        }
        (Some("direct"), _) => false,
        (Some(other), _) => {
            return Err(ConfigError::invalid(
                key("route"),
                other,
                "\"tunnel\" (the default when a [tunnel] is configured) or \"direct\"",
            ))
        }
    };
    if let (true, Some(t), Some(ip)) = (via_tunnel, &tunnel, literal_host(&r.address)) {
        if !t.routes(ip) {
            return Err(ConfigError::invalid(
        key("address"),
        &r.address,
        "an address inside tunnel.peer.allowed_ips (patient data must not leave the tunnel), or route = \"direct\"",
            ));
        }
    }
    Ok(Destination {
        ae_title: AeTitle::parse(&key("ae_title"), &r.ae_title)?,
        calling_ae_title: match &r.calling_ae_title {
            Some(t) => AeTitle::parse(&key("calling_ae_title"), t)?,
            None => own_ae.clone(),
        },
        max_pdu: max_pdu(&key("max_pdu"), r.max_pdu, 256 * 1024)?,
        connect_timeout: duration(
            &key("connect_timeout"),
            r.connect_timeout.as_deref(),
            Duration::from_secs(10),
        )?,
        response_timeout: duration(
            &key("response_timeout"),
            r.response_timeout.as_deref(),
            Duration::from_secs(120),
        )?,
        linger: duration(&key("linger"), r.linger.as_deref(), Duration::from_secs(5))?,
        associations: associations(&key("associations"), r.associations)?,
        name: r.name,
        address: r.address,
        via_tunnel,
    })
}

impl RawPriors {
    fn validate(self, have_pacs: bool) -> Result<PriorsConfig, ConfigError> {
        if !have_pacs {
            return Err(ConfigError::invalid(
                "priors",
                "(no [pacs])",
                "a [pacs] section too: priors are fetched from the hospital's PACS",
            ));
        }
        let max_studies = self.max_studies.unwrap_or(2);
        if !(1..=20).contains(&max_studies) {
            return Err(ConfigError::invalid(
                "priors.max_studies",
                max_studies.to_string(),
                "a number of studies from 1 to 20",
            ));
        }
        let get = match self.retrieve.as_deref() {
            None | Some("move") => false,
            Some("get") => true,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "priors.retrieve",
                    other,
                    "\"move\" (C-MOVE to the box's own AE, the default) or \"get\" (C-GET on the box's own association)",
                ))
            }
        };
        let max_age = duration(
            "priors.max_age",
            self.max_age.as_deref(),
            Duration::from_secs_f64(5.0 * 365.25 * 86_400.0),
        )?;
        let stable_after = duration(
            "priors.stable_after",
            self.stable_after.as_deref(),
            Duration::from_secs(120),
        )?;
        for (key, d) in [
            ("priors.stable_after", stable_after),
            ("priors.max_age", max_age),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "0", "a duration above zero"));
            }
        }
        Ok(PriorsConfig {
            max_studies: max_studies as usize,
            max_age,
            stable_after,
            same_modality: self.same_modality,
            same_body_part: self.same_body_part,
            get,
        })
    }
}

impl RawUrgent {
    fn validate(self, have_results: bool) -> Result<UrgentConfig, ConfigError> {
        if !have_results {
            return Err(ConfigError::invalid(
                "urgent",
                "(no [results])",
                "a [results] section too: urgent findings come with the center's results",
            ));
        }
        let ack_within = duration(
            "urgent.ack_within",
            self.ack_within.as_deref(),
            Duration::from_secs(15 * 60),
        )?;
        if ack_within < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "urgent.ack_within",
                self.ack_within.unwrap_or_default(),
                "a duration of at least 1s, e.g. \"15m\"",
            ));
        }
        if self.email.is_none() && self.hl7.is_none() {
            return Err(ConfigError::invalid(
                "urgent",
                "(no channel)",
                "[urgent.email] (relay, from, to) or [urgent.hl7] (ris), or both: how the box tells people",
            ));
        }
        for (i, c) in self.codes.iter().enumerate() {
            let ok = c.split_once(':').is_some_and(|(scheme, value)| {
                !scheme.is_empty() && !value.is_empty() && c.chars().all(|ch| ch.is_ascii_graphic())
            });
            if !ok {
                return Err(ConfigError::invalid(
                    format!("urgent.codes[{i}]"),
                    c,
                    "a coded finding as SCHEME:VALUE, e.g. \"SCT:36118008\" (Coding Scheme Designator and Code Value as in the SR)",
                ));
            }
        }
        let email = self.email.map(RawEmail::validate).transpose()?;
        let hl7 = self.hl7.map(|h| h.validate("urgent.hl7")).transpose()?;
        Ok(UrgentConfig {
            ack_within,
            codes: self.codes,
            email,
            hl7,
        })
    }
}

impl RawEmail {
    fn validate(self) -> Result<EmailConfig, ConfigError> {
        let e = self;
        if !host_port_ok(&e.relay) || e.relay.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "urgent.email.relay",
                &e.relay,
                "the hospital's SMTP relay as host:port, e.g. \"192.168.10.5:25\"",
            ));
        }
        mailbox("urgent.email.from", &e.from)?;
        if e.to.is_empty() {
            return Err(ConfigError::invalid(
                "urgent.email.to",
                "[]",
                "at least one address, e.g. [\"radiology-referrers@hospital.example\"]",
            ));
        }
        for (key, list) in [
            ("urgent.email.to", &e.to),
            ("urgent.email.escalate_to", &e.escalate_to),
        ] {
            for (i, a) in list.iter().enumerate() {
                mailbox(&format!("{key}[{i}]"), a)?;
            }
        }
        let timeout = duration(
            "urgent.email.timeout",
            e.timeout.as_deref(),
            Duration::from_secs(30),
        )?;
        Ok(EmailConfig {
            relay: e.relay,
            from: e.from,
            to: e.to,
            escalate_to: e.escalate_to,
            timeout,
        })
    }
}

impl RawHl7 {
    /// `section`: where it was written (`urgent.hl7`, `results.hl7`).
    fn validate(self, section: &str) -> Result<Hl7Config, ConfigError> {
        if !host_port_ok(&self.ris) || self.ris.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                format!("{section}.ris"),
                &self.ris,
                "the RIS's HL7 MLLP listener as host:port, e.g. \"192.168.10.6:2575\"",
            ));
        }
        let name = |key: &str, v: Option<String>, default: &str| -> Result<String, ConfigError> {
            let v = v.unwrap_or_else(|| default.to_string());
            if v.is_empty()
                || v.len() > 180
                || !v.chars().all(|c| c.is_ascii_graphic() || c == ' ')
                || v.contains(['|', '^', '~', '\\', '&'])
            {
                return Err(ConfigError::invalid(
                    format!("{section}.{key}"),
                    v,
                    "printable ASCII without HL7 delimiters (| ^ ~ \\ &)",
                ));
            }
            Ok(v)
        };
        Ok(Hl7Config {
            sending_application: name(
                "sending_application",
                self.sending_application,
                "KAKEHASHI",
            )?,
            sending_facility: name("sending_facility", self.sending_facility, "KAKEHASHI")?,
            receiving_application: name(
                "receiving_application",
                self.receiving_application,
                "RIS",
            )?,
            receiving_facility: name("receiving_facility", self.receiving_facility, "HOSPITAL")?,
            timeout: duration(
                &format!("{section}.timeout"),
                self.timeout.as_deref(),
                Duration::from_secs(30),
            )?,
            ris: self.ris,
        })
    }
}

/// A plain mailbox address (local@domain) that is safe in an SMTP command
/// and a header: no spaces, angle brackets, commas or control characters.
fn mailbox(key: &str, v: &str) -> Result<(), ConfigError> {
    let ok = v.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && !domain.is_empty() && !domain.contains('@')
    }) && v
        .chars()
        .all(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | ',' | '"' | '(' | ')' | ';'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            v,
            "an e-mail address such as \"radiology@hospital.example\"",
        ))
    }
}

impl RawResults {
    fn validate(self, dicom: &DicomConfig, have_pacs: bool) -> Result<ResultsConfig, ConfigError> {
        if !have_pacs {
            return Err(ConfigError::invalid(
                "results",
                "(no [pacs])",
                "a [pacs] section too: results are delivered to the hospital's PACS",
            ));
        }
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "results.listen",
                &self.listen,
                "an IP address and port, on a real box the tunnel address (e.g. \"10.8.0.2:11114\")",
            )
        })?;
        if listen == dicom.listen {
            return Err(ConfigError::invalid(
                "results.listen",
                &self.listen,
                "an address and port other than dicom.listen's",
            ));
        }
        let ae_title = match &self.ae_title {
            Some(t) => AeTitle::parse("results.ae_title", t)?,
            None => dicom.ae_title.clone(),
        };
        if self.from.is_empty() {
            return Err(ConfigError::invalid(
                "results.from",
                "[]",
                "the calling AE titles allowed to send results, e.g. [\"READCENTER\"]",
            ));
        }
        let from = self
            .from
            .iter()
            .enumerate()
            .map(|(i, t)| AeTitle::parse(&format!("results.from[{i}]"), t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sop_classes: Vec<String> = RESULT_SOP_CLASSES
            .iter()
            .map(|(u, _)| u.to_string())
            .collect();
        for (i, u) in self.extra_sop_classes.iter().enumerate() {
            if !uid_ok(u) {
                return Err(ConfigError::invalid(
                    format!("results.extra_sop_classes[{i}]"),
                    u,
                    "a storage SOP class UID such as \"1.2.840.10008.5.1.4.1.1.11.1\"",
                ));
            }
            if !sop_classes.contains(u) {
                sop_classes.push(u.clone());
            }
        }
        let mut trusted_signers = Vec::new();
        for (i, p) in self.trusted_signers.iter().enumerate() {
            let key = format!("results.trusted_signers[{i}]");
            if !p.starts_with('/') {
                return Err(ConfigError::invalid(
                    key,
                    p,
                    "an absolute path to a PEM file of certificates (the signers, or the CA that issues their certificates)",
                ));
            }
            match std::fs::read(p) {
                Ok(pem) => trusted_signers.push((PathBuf::from(p), pem)),
                Err(e) => {
                    return Err(ConfigError::invalid(
                        key,
                        p,
                        format!("a readable PEM file of certificates ({e})"),
                    ))
                }
            }
        }
        Ok(ResultsConfig {
            listen,
            ae_title,
            from,
            sop_classes,
            trusted_signers,
            require_signature: self.require_signature,
            queries: self.queries.unwrap_or(true),
            hl7: self.hl7.map(|h| h.validate("results.hl7")).transpose()?,
        })
    }
}

/// A UID as PS3.5 9.1 allows it: digits and dots, no empty or leading-zero
/// component, at most 64 characters.
fn uid_ok(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

fn duration(key: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => parse_duration(v).ok_or_else(|| ConfigError::invalid(key, v, DURATION)),
    }
}

fn size(key: &str, value: &str) -> Result<u64, ConfigError> {
    parse_bytes(value).ok_or_else(|| ConfigError::invalid(key, value, SIZE))
}

fn max_pdu(key: &str, value: Option<i64>, default: u32) -> Result<u32, ConfigError> {
    let v = value.unwrap_or(i64::from(default));
    if !(4096..=16 * 1024 * 1024).contains(&v) {
        return Err(ConfigError::invalid(
            key,
            v.to_string(),
            "a PDU size in bytes from 4096 to 16777216",
        ));
    }
    // The PDV length must be even on the wire; round down so ours always is.
    Ok((v as u32) & !1)
}

/// Associations a forwarder opens in parallel to one destination: DICOM
/// waits for each C-STORE-RSP, so one association moves one instance per
/// round trip; several fill a long link. 8 fills 0.9 of a 100 Mbit/s line
/// 40 ms away with 128 KiB MR slices, where 4 filled 0.6 (docs/benchmarks.md).
pub const DEFAULT_ASSOCIATIONS: usize = 8;

fn associations(key: &str, value: Option<i64>) -> Result<usize, ConfigError> {
    let v = value.unwrap_or(DEFAULT_ASSOCIATIONS as i64);
    if !(1..=16).contains(&v) {
        return Err(ConfigError::invalid(
            key,
            v.to_string(),
            "a number of parallel associations from 1 to 16",
        ));
    }
    Ok(v as usize)
}

fn host_port_ok(value: &str) -> bool {
    value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

/// The host part of `host:port`, as an IP address if it is a literal.
fn literal_host(value: &str) -> Option<std::net::IpAddr> {
    let (host, _) = value.rsplit_once(':')?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

impl RawTunnel {
    fn validate(self) -> Result<TunnelConfig, ConfigError> {
        let interface = self.interface.unwrap_or_else(|| "kakehashi0".to_string());
        if !interface_name_ok(&interface) {
            return Err(ConfigError::invalid(
                "tunnel.interface",
                &interface,
                "an interface name of 1 to 15 characters of a-z, A-Z, 0-9, '-', '_' and '.'",
            ));
        }
        if let Some(f) = self
            .private_key_file
            .as_ref()
            .filter(|f| !f.starts_with('/'))
        {
            return Err(ConfigError::invalid(
                "tunnel.private_key_file",
                f,
                "an absolute path to a file written by `wg genkey` (mode 0600)",
            ));
        }
        if self.address.is_empty() {
            return Err(ConfigError::invalid(
                "tunnel.address",
                "[]",
                "the box's tunnel address(es) with prefix, e.g. [\"10.8.0.2/24\"]",
            ));
        }
        let addresses = self
            .address
            .iter()
            .enumerate()
            .map(|(i, a)| IpNet::parse(&format!("tunnel.address[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let listen_port = self.listen_port.unwrap_or(51820);
        if !(0..=65535).contains(&listen_port) {
            return Err(ConfigError::invalid(
                "tunnel.listen_port",
                listen_port.to_string(),
                "a UDP port from 0 to 65535 (0: any free port)",
            ));
        }
        let mtu = self.mtu.unwrap_or(1420);
        if !(1280..=9000).contains(&mtu) {
            return Err(ConfigError::invalid(
                "tunnel.mtu",
                mtu.to_string(),
                "an MTU from 1280 to 9000 (1420 suits a 1500-byte link)",
            ));
        }
        let handshake_timeout = duration(
            "tunnel.handshake_timeout",
            self.handshake_timeout.as_deref(),
            Duration::from_secs(150),
        )?;
        if !(Duration::from_secs(5)..=Duration::from_secs(170)).contains(&handshake_timeout) {
            return Err(ConfigError::invalid(
                "tunnel.handshake_timeout",
                self.handshake_timeout.unwrap_or_default(),
                "from 5s to 170s: below WireGuard's 180 s session lifetime, so the endpoint's name is resolved again before the session dies (WireGuard renews its handshake every 2 minutes)",
            ));
        }
        let p = self.peer;
        let public_key = base64::engine::general_purpose::STANDARD
            .decode(p.public_key.trim())
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| {
                ConfigError::invalid(
                    "tunnel.peer.public_key",
                    &p.public_key,
                    "the center's WireGuard public key: 44 characters of base64, as `wg pubkey` prints it",
                )
            })?;
        if !host_port_ok(&p.endpoint) {
            return Err(ConfigError::invalid(
                "tunnel.peer.endpoint",
                &p.endpoint,
                "host:port, e.g. \"wg.center.example:51820\" or \"203.0.113.7:51820\"",
            ));
        }
        if p.allowed_ips.is_empty() {
            return Err(ConfigError::invalid(
                "tunnel.peer.allowed_ips",
                "[]",
                "the center's networks inside the tunnel, e.g. [\"10.8.0.0/24\"]",
            ));
        }
        let allowed_ips = p
            .allowed_ips
            .iter()
            .enumerate()
            .map(|(i, a)| IpNet::parse(&format!("tunnel.peer.allowed_ips[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        let persistent_keepalive = duration(
            "tunnel.peer.persistent_keepalive",
            p.persistent_keepalive.as_deref(),
            Duration::from_secs(25),
        )?;
        if persistent_keepalive > Duration::from_secs(65535) {
            return Err(ConfigError::invalid(
                "tunnel.peer.persistent_keepalive",
                p.persistent_keepalive.unwrap_or_default(),
                "at most 65535s (0 turns it off)",
            ));
        }
        Ok(TunnelConfig {
            interface,
            private_key_file: self.private_key_file.map(PathBuf::from),
            addresses,
            listen_port: listen_port as u16,
            mtu: mtu as u32,
            handshake_timeout,
            peer: TunnelPeer {
                public_key,
                endpoint: p.endpoint,
                allowed_ips,
                persistent_keepalive,
            },
            link_by_system: false,
        })
    }
}

impl RawConfig {
    pub(crate) fn validate(self) -> Result<Config, ConfigError> {
        let mut tunnel = self.tunnel.map(RawTunnel::validate).transpose()?;
        let network = self.network.map(RawNetwork::validate).transpose()?;
        if let Some(t) = tunnel.as_mut() {
            t.link_by_system = network.is_some();
        }
        if let (Some(n), Some(t)) = (&network, &tunnel) {
            if [&n.lan.interface, &n.wan.interface].contains(&&t.interface) {
                return Err(ConfigError::invalid(
                    "tunnel.interface",
                    &t.interface,
                    "a name of its own (not network.lan's or network.wan's)",
                ));
            }
        }
        let tpm = self.tpm.map(RawTpm::validate).transpose()?;
        if let Some(t) = &tunnel {
            if t.private_key_file.is_none() && tpm.is_none() {
                return Err(ConfigError::invalid(
                    "tunnel.private_key_file",
                    "(none)",
                    "a key file, or a [tpm] section so the key is sealed by the TPM (run `kakehashi provision`)",
                ));
            }
        }
        let d = self.dicom;
        let ae_title = AeTitle::parse("dicom.ae_title", &d.ae_title)?;
        let listen = d.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "dicom.listen",
                &d.listen,
                "an IP address and port such as \"0.0.0.0:104\" or \"127.0.0.1:11112\"",
            )
        })?;
        if d.sources.is_empty() {
            return Err(ConfigError::invalid(
                "dicom.sources",
                "[]",
                "at least one [[dicom.sources]] entry (the AE titles allowed to send to the box)",
            ));
        }
        let mut sources = Vec::new();
        for (i, s) in d.sources.iter().enumerate() {
            let src = Source {
                ae_title: AeTitle::parse(&format!("dicom.sources[{i}].ae_title"), &s.ae_title)?,
                address: s
                    .address
                    .as_deref()
                    .map(|a| IpNet::parse(&format!("dicom.sources[{i}].address"), a))
                    .transpose()?,
                port: s.port,
                high_priority: match s.priority.as_deref() {
                    None | Some("as-sent") => false,
                    Some("high") => true,
                    Some(other) => {
                        return Err(ConfigError::invalid(
                            format!("dicom.sources[{i}].priority"),
                            other,
                            "\"as-sent\" (the C-STORE priority the sender gives) or \"high\" (everything from this source goes first)",
                        ))
                    }
                },
            };
            sources.push(src);
        }
        let max_associations = d.max_associations.unwrap_or(16);
        if !(1..=1024).contains(&max_associations) {
            return Err(ConfigError::invalid(
                "dicom.max_associations",
                max_associations.to_string(),
                "a number from 1 to 1024",
            ));
        }
        let dicom = DicomConfig {
            ae_title: ae_title.clone(),
            listen,
            max_pdu: max_pdu("dicom.max_pdu", d.max_pdu, 256 * 1024)?,
            max_associations: max_associations as usize,
            idle_timeout: duration(
                "dicom.idle_timeout",
                d.idle_timeout.as_deref(),
                Duration::from_secs(120),
            )?,
            sources,
        };

        if self.destinations.is_empty() {
            return Err(ConfigError::invalid(
                "destinations",
                "[]",
                "at least one [[destinations]] entry (where studies are forwarded)",
            ));
        }
        let mut destinations: Vec<Destination> = Vec::new();
        for (i, r) in self.destinations.into_iter().enumerate() {
            let key = |k: &str| format!("destinations[{i}].{k}");
            let name_ok = !r.name.is_empty()
                && r.name.len() <= 64
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return Err(ConfigError::invalid(
                    key("name"),
                    &r.name,
                    "1 to 64 characters of a-z, A-Z, 0-9, '-' and '_'",
                ));
            }
            if destinations.iter().any(|d| d.name == r.name) {
                return Err(ConfigError::invalid(
                    key("name"),
                    &r.name,
                    "a name not used by another destination",
                ));
            }
            if r.name == PACS_DESTINATION {
                return Err(ConfigError::invalid(
                    key("name"),
                    &r.name,
                    "another name (\"pacs\" is the [pacs] section's forwarder)",
                ));
            }
            destinations.push(destination(
                &format!("destinations[{i}]"),
                r,
                &ae_title,
                tunnel.as_ref(),
            )?);
        }
        let pacs = self
            .pacs
            .map(|p| {
                destination(
                    "pacs",
                    RawDestination {
                        name: PACS_DESTINATION.to_string(),
                        ae_title: p.ae_title,
                        address: p.address,
                        calling_ae_title: p.calling_ae_title,
                        max_pdu: p.max_pdu,
                        connect_timeout: p.connect_timeout,
                        response_timeout: p.response_timeout,
                        linger: p.linger,
                        associations: p.associations,
                        // The PACS is in the hospital: direct unless said otherwise.
                        route: Some(p.route.unwrap_or_else(|| "direct".into())),
                    },
                    &ae_title,
                    tunnel.as_ref(),
                )
            })
            .transpose()?;
        let results = self
            .results
            .map(|r| r.validate(&dicom, pacs.is_some()))
            .transpose()?;
        let priors = self
            .priors
            .map(|p| p.validate(pacs.is_some()))
            .transpose()?;
        let urgent = self
            .urgent
            .map(|u| u.validate(results.is_some()))
            .transpose()?;
        let metrics = self
            .metrics
            .map(|m| m.validate(tunnel.as_ref(), network.as_ref(), &dicom))
            .transpose()?;

        let s = self.spool;
        if s.dir.trim().is_empty() || !s.dir.starts_with('/') {
            return Err(ConfigError::invalid(
                "spool.dir",
                &s.dir,
                "an absolute directory path",
            ));
        }
        let max_size = size("spool.max_size", &s.max_size)?;
        if max_size < 1 << 20 {
            return Err(ConfigError::invalid(
                "spool.max_size",
                &s.max_size,
                "at least 1 MiB",
            ));
        }
        let spool = SpoolConfig {
            dir: PathBuf::from(s.dir),
            max_size,
            min_free: match &s.min_free {
                Some(v) => size("spool.min_free", v)?,
                None => 512 << 20,
            },
            retention: duration("spool.retention", s.retention.as_deref(), Duration::ZERO)?,
        };

        let initial = duration(
            "retry.initial",
            self.retry.initial.as_deref(),
            Duration::from_secs(5),
        )?;
        let max = duration(
            "retry.max",
            self.retry.max.as_deref(),
            Duration::from_secs(300),
        )?;
        if initial.is_zero() {
            return Err(ConfigError::invalid(
                "retry.initial",
                self.retry.initial.unwrap_or_default(),
                "a duration above zero",
            ));
        }
        if max < initial {
            return Err(ConfigError::invalid(
                "retry.max",
                self.retry.max.unwrap_or_default(),
                format!("a duration not shorter than retry.initial ({initial:?})"),
            ));
        }
        let stuck_after_attempts = self.retry.stuck_after_attempts.unwrap_or(20);
        if !(1..=1_000_000).contains(&stuck_after_attempts) {
            return Err(ConfigError::invalid(
                "retry.stuck_after_attempts",
                stuck_after_attempts.to_string(),
                "a number of attempts from 1 to 1000000",
            ));
        }
        let stuck_after = duration(
            "retry.stuck_after",
            self.retry.stuck_after.as_deref(),
            Duration::from_secs(24 * 3600),
        )?;
        if stuck_after.is_zero() {
            return Err(ConfigError::invalid(
                "retry.stuck_after",
                self.retry.stuck_after.unwrap_or_default(),
                "a duration above zero (e.g. \"24h\")",
            ));
        }

        let socket = self
            .control
            .socket
            .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.to_string());
        if !socket.starts_with('/') {
            return Err(ConfigError::invalid(
                "control.socket",
                &socket,
                "an absolute path",
            ));
        }
        let format = match self.log.format.as_deref().unwrap_or("auto") {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            "journald" => LogFormat::Journald,
            other => {
                return Err(ConfigError::invalid(
                    "log.format",
                    other,
                    "one of \"auto\", \"text\", \"json\", \"journald\"",
                ))
            }
        };
        let audit_dir = self
            .audit
            .dir
            .unwrap_or_else(|| "/var/lib/kakehashi/audit".to_string());
        if !audit_dir.starts_with('/') {
            return Err(ConfigError::invalid(
                "audit.dir",
                &audit_dir,
                "an absolute directory path",
            ));
        }
        let keep = duration(
            "audit.keep",
            self.audit.keep.as_deref(),
            Duration::from_secs(90 * 86_400),
        )?;
        if keep < Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "audit.keep",
                self.audit.keep.unwrap_or_default(),
                "at least \"1h\" (older records move to the export files in audit.dir)",
            ));
        }
        let max_records = self.audit.max_records.unwrap_or(1_000_000);
        if !(10..=100_000_000).contains(&max_records) {
            return Err(ConfigError::invalid(
                "audit.max_records",
                max_records.to_string(),
                "a number from 10 to 100000000",
            ));
        }
        let level = self.log.level.unwrap_or_else(|| "info".to_string());
        if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            return Err(ConfigError::invalid(
                "log.level",
                &level,
                "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
            ));
        }

        Ok(Config {
            dicom,
            destinations,
            spool,
            retry: RetryPolicy {
                initial,
                max,
                stuck_after_attempts: stuck_after_attempts as u32,
                stuck_after,
            },
            control: ControlConfig {
                socket: PathBuf::from(socket),
            },
            log: LogConfig { format, level },
            network,
            audit: AuditConfig {
                dir: PathBuf::from(audit_dir),
                keep,
                max_records: max_records as u64,
            },
            tunnel,
            tpm,
            pacs,
            results,
            priors,
            urgent,
            metrics,
        })
    }
}
