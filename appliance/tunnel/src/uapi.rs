//! The WireGuard cross-platform UAPI text protocol
//! (<https://www.wireguard.com/xplatform/>): parsing boringtun's `get`
//! answer, and writing a truthful one for `wg show`.
//!
//! boringtun 0.7 answers `get` with two departures from the protocol that
//! this module corrects (pinned to boringtun =0.7.1; a system test checks
//! `wg show` against them):
//! - `last_handshake_time_sec`/`_nsec` carry the handshake's *age*, not the
//!   time since the epoch, so `wg` prints "56 years ago";
//! - it sends `own_public_key=` instead of `private_key=`, so `wg` shows no
//!   interface key.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

/// One peer as boringtun reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDump {
    pub public_key_hex: String,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<String>,
    /// Time since the last completed handshake; `None` if there was none.
    pub handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The device as boringtun reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceDump {
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerDump>,
}

/// Parses boringtun's answer to `get=1` (without the `errno=` line).
pub fn parse_get(text: &str) -> Result<DeviceDump, String> {
    let mut dump = DeviceDump::default();
    let mut secs: Option<u64> = None;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("malformed UAPI line {line:?}"))?;
        let bad = || format!("malformed UAPI value in {line:?}");
        if key == "public_key" {
            dump.peers.push(PeerDump {
                public_key_hex: value.to_string(),
                ..PeerDump::default()
            });
            secs = None;
            continue;
        }
        match (dump.peers.last_mut(), key) {
            (_, "own_public_key" | "private_key" | "protocol_version") => {}
            (None, "listen_port") => dump.listen_port = Some(value.parse().map_err(|_| bad())?),
            (None, "fwmark") => dump.fwmark = Some(value.parse().map_err(|_| bad())?),
            (Some(p), "endpoint") => p.endpoint = Some(value.parse().map_err(|_| bad())?),
            (Some(p), "persistent_keepalive_interval") => {
                p.persistent_keepalive = Some(value.parse().map_err(|_| bad())?)
            }
            (Some(p), "allowed_ip") => p.allowed_ips.push(value.to_string()),
            (Some(_), "last_handshake_time_sec") => secs = Some(value.parse().map_err(|_| bad())?),
            (Some(p), "last_handshake_time_nsec") => {
                let nanos: u32 = value.parse().map_err(|_| bad())?;
                // boringtun 0.7: an age, not an epoch time (see the module docs).
                p.handshake_age = Some(Duration::new(secs.unwrap_or(0), nanos));
            }
            (Some(p), "rx_bytes") => p.rx_bytes = value.parse().map_err(|_| bad())?,
            (Some(p), "tx_bytes") => p.tx_bytes = value.parse().map_err(|_| bad())?,
            (Some(_), "preshared_key") => {}
            _ => return Err(format!("unexpected UAPI key {key:?}")),
        }
    }
    Ok(dump)
}

/// The `get=1` answer the protocol specifies: the private key, and handshake
/// times since the epoch (0 when there was none). Ends with `errno=0`.
pub fn format_get(dump: &DeviceDump, private_key_hex: &str, now: SystemTime) -> Zeroizing<String> {
    use std::fmt::Write as _;
    let mut out = Zeroizing::new(String::new());
    let _ = writeln!(out, "private_key={private_key_hex}");
    if let Some(port) = dump.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = dump.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    for p in &dump.peers {
        let _ = writeln!(out, "public_key={}", p.public_key_hex);
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
        let at = p
            .handshake_age
            .and_then(|age| now.checked_sub(age))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", at.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", at.subsec_nanos());
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "protocol_version=1");
    }
    out.push_str("errno=0\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BORINGTUN_GET: &str = "own_public_key=88\nlisten_port=51820\n\
        public_key=abcd\npersistent_keepalive_interval=25\nendpoint=198.51.100.2:51820\n\
        allowed_ip=10.8.0.0/24\nlast_handshake_time_sec=2\nlast_handshake_time_nsec=500000000\n\
        rx_bytes=92\ntx_bytes=148\n";

    #[test]
    fn boringtun_age_becomes_epoch_time() {
        let dump = parse_get(BORINGTUN_GET).expect("parses");
        let p = &dump.peers[0];
        assert_eq!(p.handshake_age, Some(Duration::from_millis(2500)));
        assert_eq!(
            p.endpoint,
            Some("198.51.100.2:51820".parse().expect("addr"))
        );
        assert_eq!((p.rx_bytes, p.tx_bytes), (92, 148));
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let text = format_get(&dump, "ff", now);
        assert!(
            text.starts_with("private_key=ff\nlisten_port=51820\n"),
            "{}",
            *text
        );
        assert!(
            text.contains("last_handshake_time_sec=1799999997\n"),
            "{}",
            *text
        );
        assert!(
            text.contains("last_handshake_time_nsec=500000000\n"),
            "{}",
            *text
        );
        assert!(!text.contains("own_public_key"));
        assert!(text.ends_with("errno=0\n\n"));
    }

    #[test]
    fn no_handshake_is_zero_and_garbage_is_an_error() {
        let dump = parse_get("listen_port=1\npublic_key=ab\nrx_bytes=0\ntx_bytes=0\n").expect("ok");
        assert_eq!(dump.peers[0].handshake_age, None);
        let text = format_get(&dump, "ff", SystemTime::now());
        assert!(text.contains("last_handshake_time_sec=0\n"));
        assert!(parse_get("nonsense").is_err());
        assert!(parse_get("public_key=ab\nrx_bytes=lots\n").is_err());
    }
}
