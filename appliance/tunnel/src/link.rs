//! Addresses, MTU and routes of the interface, set with iproute2's `ip`
//! (as `wg-quick` does). boringtun's TUN comes up with MTU 1500; we set the
//! configured one (1420 by default: 1500 minus WireGuard's 80-byte overhead
//! over IPv6).

use std::net::IpAddr;
use std::process::Command;

use kakehashi_config::{IpNet, TunnelConfig};

use crate::TunnelError;

/// `net` with its host bits cleared (`ip route` refuses them).
pub(crate) fn network(net: &IpNet) -> IpNet {
    let text = match net.addr() {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(net.prefix()))
                .unwrap_or(0);
            format!(
                "{}/{}",
                std::net::Ipv4Addr::from(u32::from(a) & mask),
                net.prefix()
            )
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(net.prefix()))
                .unwrap_or(0);
            format!(
                "{}/{}",
                std::net::Ipv6Addr::from(u128::from(a) & mask),
                net.prefix()
            )
        }
    };
    IpNet::parse("", &text).unwrap_or(*net)
}

fn ip(interface: &str, args: &[&str]) -> Result<(), TunnelError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| TunnelError::Link {
            interface: interface.to_string(),
            command: command.clone(),
            message: format!("{e} (is iproute2 installed?)"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunnelError::Link {
            interface: interface.to_string(),
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

pub(crate) fn configure(config: &TunnelConfig) -> Result<(), TunnelError> {
    let dev = config.interface.as_str();
    let mtu = config.mtu.to_string();
    ip(dev, &["link", "set", "dev", dev, "mtu", &mtu])?;
    for a in &config.addresses {
        ip(dev, &["address", "replace", &a.to_string(), "dev", dev])?;
    }
    ip(dev, &["link", "set", "dev", dev, "up"])?;
    for net in &config.peer.allowed_ips {
        let net = network(net).to_string();
        ip(dev, &["route", "replace", &net, "dev", dev])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bits_are_cleared() {
        let n = IpNet::parse("k", "10.8.0.7/24").expect("net");
        assert_eq!(network(&n).to_string(), "10.8.0.0/24");
        let n = IpNet::parse("k", "fd00::5/64").expect("net");
        assert_eq!(network(&n).to_string(), "fd00::/64");
        let n = IpNet::parse("k", "10.8.0.7").expect("host");
        assert_eq!(network(&n).to_string(), "10.8.0.7/32");
    }
}
