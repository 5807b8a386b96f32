//! What the appliance image's `kakehashi appliance render` writes from the
//! box's config, as plain text: systemd-networkd files for the LAN and WAN
//! ports and the WireGuard TUN (owned by user kakehashi, so the daemon
//! needs no privilege), and the nftables ruleset.
//!
//! The firewall: input dropped unless it is loopback, a reply to what the
//! box opened, the DICOM port on the LAN from the configured sources'
//! addresses (echo requests too, for the hospital's IT), WireGuard's port on
//! the WAN, the results port on the tunnel from the center's networks (with
//! `[results]`), and DHCP replies where DHCP is used; nothing is forwarded; out on
//! the WAN only WireGuard (to the endpoint's port, and its address when it
//! is literal), DNS and NTP; on the LAN and into the tunnel, anything the
//! box opens. Without a config everything but loopback is dropped.

use std::net::IpAddr;

use kakehashi_config::{Config, IpNet, NetworkConfig, Port};

/// The user the TUN belongs to (systemd/kakehashi.sysusers).
const SERVICE_USER: &str = "kakehashi";

/// systemd-networkd files: (file name, content).
pub fn networkd(config: &Config) -> Vec<(String, String)> {
    let Some(net) = &config.network else {
        return Vec::new();
    };
    let mut files = vec![
        ("10-kakehashi-lan.network".to_string(), port(&net.lan, net)),
        ("10-kakehashi-wan.network".to_string(), port(&net.wan, net)),
    ];
    if let Some(t) = &config.tunnel {
        files.push((
            "20-kakehashi-tunnel.netdev".to_string(),
            format!(
                "# The WireGuard interface: kakehashid (boringtun) attaches to it, with\n# the flags it asks for (multi-queue, no packet information).\n[NetDev]\nName={}\nKind=tun\n\n[Tun]\nMultiQueue=yes\nPacketInfo=no\nUser={SERVICE_USER}\nGroup={SERVICE_USER}\n",
                t.interface
            ),
        ));
        // networkd ignores MTUBytes= in a tun's .netdev; [Link] sets it.
        let mut network = format!(
            "[Match]\nName={}\n\n[Link]\nMTUBytes={}\nRequiredForOnline=no\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n# It has a carrier once kakehashid attaches.\nConfigureWithoutCarrier=yes\nIgnoreCarrierLoss=yes\n",
            t.interface, t.mtu
        );
        for a in &t.addresses {
            network += &format!("Address={a}\n");
        }
        for allowed in &t.peer.allowed_ips {
            // A network an address already brings needs no route of its own.
            if !t.addresses.iter().any(|a| same_network(a, allowed)) {
                network += &format!("\n[Route]\nDestination={}\n", base(allowed));
            }
        }
        files.push(("20-kakehashi-tunnel.network".to_string(), network));
    }
    files
}

fn port(p: &Port, net: &NetworkConfig) -> String {
    let mut s = format!(
        "[Match]\nName={}\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
        p.interface
    );
    match &p.address {
        Some(a) => s += &format!("Address={a}\n"),
        None => s += "DHCP=ipv4\n",
    }
    if let Some(g) = p.gateway {
        s += &format!("Gateway={g}\n");
    }
    for d in &net.dns {
        s += &format!("DNS={d}\n");
    }
    for n in &net.ntp {
        s += &format!("NTP={n}\n");
    }
    if p.address.is_none() {
        // A stable identity for the DHCP server whatever the machine id.
        s += "\n[DHCPv4]\nClientIdentifier=mac\n";
    }
    s
}

fn base(net: &IpNet) -> String {
    let bits = u32::from(net.prefix());
    match net.addr() {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            format!("{}/{}", std::net::Ipv4Addr::from(u32::from(a) & mask), bits)
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            format!(
                "{}/{}",
                std::net::Ipv6Addr::from(u128::from(a) & mask),
                bits
            )
        }
    }
}

fn same_network(a: &IpNet, b: &IpNet) -> bool {
    a.prefix() == b.prefix() && base(a) == base(b)
}

/// The nftables ruleset (see the module doc). `None`: not provisioned yet.
pub fn nftables(config: Option<&Config>) -> String {
    let mut r = String::from(
        "#!/usr/sbin/nft -f\n# Written by kakehashi appliance render from the box's config.\nflush ruleset\n\ntable inet kakehashi {\n",
    );
    let Some((c, net)) = config.and_then(|c| c.network.as_ref().map(|n| (c, n))) else {
        r += "\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tiif lo accept\n\t}\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n\tchain output {\n\t\ttype filter hook output priority filter; policy drop;\n\t\toif lo accept\n\t}\n}\n";
        return r;
    };
    let (lan, wan) = (&net.lan.interface, &net.wan.interface);
    let dicom = c.dicom.listen.port();
    let mut input = vec![
        "iif lo accept".to_string(),
        "ct state established,related accept".to_string(),
        "ct state invalid drop".to_string(),
    ];
    let any_source = c.dicom.sources.iter().any(|s| s.address.is_none());
    let v4: Vec<String> = source_nets(c, true);
    let v6: Vec<String> = source_nets(c, false);
    if any_source {
        input.push(format!("iifname \"{lan}\" tcp dport {dicom} accept"));
    } else {
        if !v4.is_empty() {
            input.push(format!(
                "iifname \"{lan}\" ip saddr {{ {} }} tcp dport {dicom} accept",
                v4.join(", ")
            ));
        }
        if !v6.is_empty() {
            input.push(format!(
                "iifname \"{lan}\" ip6 saddr {{ {} }} tcp dport {dicom} accept",
                v6.join(", ")
            ));
        }
    }
    // Prometheus scrapes from the hospital side only; never the WAN or
    // the tunnel, whatever address metrics.listen names.
    if let Some(m) = &c.metrics {
        input.push(format!(
            "iifname \"{lan}\" tcp dport {} accept",
            m.listen.port()
        ));
    }
    input.push(format!("iifname \"{lan}\" icmp type echo-request accept"));
    let mut output = vec![
        "oif lo accept".to_string(),
        "ct state established,related accept".to_string(),
        format!("oifname \"{lan}\" accept"),
    ];
    if let Some(t) = &c.tunnel {
        if t.listen_port != 0 {
            input.push(format!(
                "iifname \"{wan}\" udp dport {} accept",
                t.listen_port
            ));
        }
        output.push(format!("oifname \"{}\" accept", t.interface));
        // The center's results (and its queries) come in through the tunnel
        // only, from the peer's networks, to the results port.
        if let Some(res) = &c.results {
            for (family, v4) in [("ip", true), ("ip6", false)] {
                let n = nets(t.peer.allowed_ips.iter().copied(), v4);
                if !n.is_empty() {
                    input.push(format!(
                        "iifname \"{}\" {family} saddr {{ {} }} tcp dport {} accept",
                        t.interface,
                        n.join(", "),
                        res.listen.port()
                    ));
                }
            }
        }
        let (host, port) = t.peer.endpoint.rsplit_once(':').unwrap_or(("", "51820"));
        match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => output.push(format!(
                "oifname \"{wan}\" ip daddr {a} udp dport {port} accept"
            )),
            Ok(IpAddr::V6(a)) => output.push(format!(
                "oifname \"{wan}\" ip6 daddr {a} udp dport {port} accept"
            )),
            // A name may move: its port, wherever it resolves.
            Err(_) => output.push(format!("oifname \"{wan}\" udp dport {port} accept")),
        }
    }
    output.push(format!(
        "oifname \"{wan}\" meta l4proto {{ tcp, udp }} th dport 53 accept"
    ));
    output.push(format!("oifname \"{wan}\" udp dport 123 accept"));
    for (p, name) in [(&net.lan, lan), (&net.wan, wan)] {
        if p.address.is_none() {
            input.push(format!(
                "iifname \"{name}\" udp sport 67 udp dport 68 accept"
            ));
            output.push(format!(
                "oifname \"{name}\" udp sport 68 udp dport 67 accept"
            ));
        }
    }
    let chain = |name: &str, hook: &str, rules: &[String]| {
        let mut s = format!(
            "\tchain {name} {{\n\t\ttype filter hook {hook} priority filter; policy drop;\n"
        );
        for rule in rules {
            s += &format!("\t\t{rule}\n");
        }
        s + "\t}\n"
    };
    r += &chain("input", "input", &input);
    r += &chain("forward", "forward", &[]);
    r += &chain("output", "output", &output);
    r + "}\n"
}

fn source_nets(c: &Config, v4: bool) -> Vec<String> {
    nets(c.dicom.sources.iter().filter_map(|s| s.address), v4)
}

/// The IPv4 (or IPv6) networks among `all`, as nftables writes them, sorted.
fn nets(all: impl Iterator<Item = IpNet>, v4: bool) -> Vec<String> {
    let mut out: Vec<String> = all
        .filter(|a| a.addr().is_ipv4() == v4)
        .map(|a| base(&a))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[dicom]
ae_title = "KAKEHASHI"
listen = "0.0.0.0:104"
[[dicom.sources]]
ae_title = "PACS"
address = "192.0.2.10"
[[dicom.sources]]
ae_title = "CT"
address = "192.0.2.0/28"
[[destinations]]
name = "center"
ae_title = "READCENTER"
address = "10.8.0.1:11112"
[spool]
dir = "/var/lib/kakehashi/spool"
max_size = "1 GiB"
[tunnel]
interface = "kk0"
private_key_file = "/k"
address = ["10.8.0.2/24"]
[tunnel.peer]
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
endpoint = "wg.center.example:51820"
allowed_ips = ["10.8.0.0/24", "10.9.0.0/16"]
[pacs]
ae_title = "PACS"
address = "192.0.2.10:104"
[results]
listen = "10.8.0.2:11114"
from = ["READCENTER"]
[network]
[network.lan]
interface = "enp0s3"
address = "192.0.2.1/24"
[network.wan]
interface = "enp0s4"
address = "dhcp"
"#;

    #[test]
    fn the_firewall_opens_only_what_the_config_needs() {
        let c = Config::parse(CONFIG).expect("config");
        let r = nftables(Some(&c));
        assert!(r.contains("policy drop;"), "{r}");
        assert!(
            r.contains(
                "iifname \"enp0s3\" ip saddr { 192.0.2.0/28, 192.0.2.10/32 } tcp dport 104 accept"
            ),
            "{r}"
        );
        assert!(
            r.contains("iifname \"enp0s4\" udp dport 51820 accept"),
            "{r}"
        );
        assert!(
            r.contains("oifname \"enp0s4\" udp dport 51820 accept"),
            "a name: its port wherever it resolves\n{r}"
        );
        assert!(
            r.contains(
                "chain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}"
            ),
            "{r}"
        );
        assert!(
            r.contains("udp sport 67 udp dport 68"),
            "DHCP on the WAN\n{r}"
        );
        assert!(
            !r.contains("iifname \"enp0s4\" tcp"),
            "no TCP in from the WAN\n{r}"
        );
        assert!(
            r.contains(
                "iifname \"kk0\" ip saddr { 10.8.0.0/24, 10.9.0.0/16 } tcp dport 11114 accept"
            ),
            "results through the tunnel only\n{r}"
        );
        let closed = nftables(None);
        assert!(
            closed.contains("policy drop;") && !closed.contains("accept\n\t\tct"),
            "{closed}"
        );
        assert!(
            !r.contains("9102"),
            "no metrics port without [metrics]\n{r}"
        );
        let with_metrics = CONFIG.to_string() + "[metrics]\nlisten = \"0.0.0.0:9102\"\n";
        let r = nftables(Some(&Config::parse(&with_metrics).expect("config")));
        assert!(
            r.contains("iifname \"enp0s3\" tcp dport 9102 accept"),
            "metrics from the LAN\n{r}"
        );
        assert_eq!(r.matches("9102").count(), 1, "and from nowhere else\n{r}");
    }

    #[test]
    fn networkd_gets_both_ports_and_a_tun_for_the_daemon() {
        let c = Config::parse(CONFIG).expect("config");
        let files = networkd(&c);
        let get = |n: &str| {
            files
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        assert!(get("10-kakehashi-lan.network").contains("Address=192.0.2.1/24"));
        assert!(get("10-kakehashi-wan.network").contains("DHCP=ipv4"));
        let netdev = get("20-kakehashi-tunnel.netdev");
        assert!(
            netdev.contains("Kind=tun")
                && netdev.contains("MultiQueue=yes")
                && netdev.contains("User=kakehashi"),
            "{netdev}"
        );
        let tun = get("20-kakehashi-tunnel.network");
        assert!(tun.contains("[Link]\nMTUBytes=1420\n"), "{tun}");
        assert!(tun.contains("Address=10.8.0.2/24"), "{tun}");
        assert!(tun.contains("Destination=10.9.0.0/16"), "{tun}");
        assert!(
            !tun.contains("Destination=10.8.0.0/24"),
            "the address brings that route\n{tun}"
        );
    }
}
