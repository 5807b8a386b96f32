use super::*;

const ISSUE_EXAMPLE: &str = r#"
[dicom]
ae_title = "KAKEHASHI"
listen = "127.0.0.1:11112"

[[dicom.sources]]          # who may send to the box; an association from anyone else is rejected
ae_title = "MODALITY1"
# address = "192.168.10.0/24"   # optional IP or CIDR the association must come from

[[destinations]]
name = "reading-center"
ae_title = "READCENTER"
address = "127.0.0.1:11113"

[spool]
dir = "/var/lib/kakehashi/spool"
max_size = "50 GiB"
"#;

fn err(text: &str) -> String {
    Config::parse(text)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn issue_example_means_what_it_says() {
    let c = Config::parse(ISSUE_EXAMPLE).expect("the documented example must load");
    assert_eq!(c.dicom.ae_title.as_str(), "KAKEHASHI");
    assert_eq!(c.dicom.listen, "127.0.0.1:11112".parse().expect("addr"));
    assert_eq!(
        c.dicom.sources,
        vec![Source {
            ae_title: AeTitle("MODALITY1".into()),
            address: None,
            port: None,
            high_priority: false,
        }]
    );
    assert_eq!(c.destinations[0].name, "reading-center");
    assert_eq!(c.destinations[0].ae_title.as_str(), "READCENTER");
    assert_eq!(c.destinations[0].address, "127.0.0.1:11113");
    assert_eq!(c.destinations[0].calling_ae_title.as_str(), "KAKEHASHI");
    assert_eq!(c.destinations[0].associations, 8);
    assert_eq!(c.spool.dir, PathBuf::from("/var/lib/kakehashi/spool"));
    assert_eq!(c.spool.max_size, 50 * (1 << 30));
    assert_eq!(c.control.socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
}

#[test]
fn shipped_examples_load() {
    for name in ["kakehashi.toml", "minimal.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name);
        Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn unknown_key_is_named() {
    let e = err(&ISSUE_EXAMPLE.replace(
        "max_size = \"50 GiB\"",
        "max_size = \"50 GiB\"\nmax_sise = 1",
    ));
    assert!(e.contains("max_sise"), "{e}");
}

#[test]
fn bad_values_name_key_value_and_expectation() {
    let e = err(&ISSUE_EXAMPLE.replace("\"50 GiB\"", "\"fifty\""));
    assert!(
        e.contains("spool.max_size") && e.contains("fifty") && e.contains("GiB"),
        "{e}"
    );
    let e = err(&ISSUE_EXAMPLE.replace("\"MODALITY1\"", "\"THIS_AE_TITLE_IS_TOO_LONG\""));
    assert!(
        e.contains("dicom.sources[0].ae_title") && e.contains("16"),
        "{e}"
    );
    for n in ["0", "17"] {
        let e = err(&ISSUE_EXAMPLE.replace(
            "address = \"127.0.0.1:11113\"",
            &format!("address = \"127.0.0.1:11113\"\nassociations = {n}"),
        ));
        assert!(
            e.contains("destinations[0].associations") && e.contains("1 to 16"),
            "{e}"
        );
    }
    let e = err(&ISSUE_EXAMPLE.replace("\"127.0.0.1:11113\"", "\"nohostport\""));
    assert!(e.contains("destinations[0].address"), "{e}");
    let e = err(&ISSUE_EXAMPLE.replace(
        "# address = \"192.168.10.0/24\"",
        "address = \"192.168.10.0/33\"",
    ));
    assert!(
        e.contains("dicom.sources[0].address") && e.contains("CIDR"),
        "{e}"
    );
    let e = err(&ISSUE_EXAMPLE.replace("listen = \"127.0.0.1:11112\"", "listen = \"localhost\""));
    assert!(e.contains("dicom.listen"), "{e}");
    let e = err(&ISSUE_EXAMPLE.replace("# address = \"192.168.10.0/24\"", "priority = \"urgent\""));
    assert!(
        e.contains("dicom.sources[0].priority") && e.contains("\"high\""),
        "{e}"
    );
}

#[test]
fn cidr_matching() {
    let net = IpNet::parse("k", "192.168.10.0/24").expect("net");
    assert!(net.contains("192.168.10.77".parse().expect("ip")));
    assert!(!net.contains("192.168.11.1".parse().expect("ip")));
    assert!(net.contains("::ffff:192.168.10.5".parse().expect("ip")));
    let host = IpNet::parse("k", "10.0.0.1").expect("host");
    assert!(host.contains("10.0.0.1".parse().expect("ip")));
    assert!(!host.contains("10.0.0.2".parse().expect("ip")));
    assert!(IpNet::parse("k", "0.0.0.0/0")
        .expect("any")
        .contains("8.8.8.8".parse().expect("ip")));
}

#[test]
fn units() {
    assert_eq!(parse_bytes("1.5 KiB"), Some(1536));
    assert_eq!(parse_bytes("10MB"), Some(10_000_000));
    assert_eq!(parse_bytes("12 parsecs"), None);
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
    assert_eq!(parse_duration("5 fortnights"), None);
    assert_eq!(format_bytes(1536), "1.5 KiB");
}

const TUNNEL: &str = r#"
[tunnel]
interface = "kk0"
private_key_file = "/etc/kakehashi/wg.key"
address = ["10.8.0.2/24"]

[tunnel.peer]
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
endpoint = "wg.center.example:51820"
allowed_ips = ["10.8.0.0/24"]
"#;

fn with_tunnel(destination_address: &str) -> String {
    ISSUE_EXAMPLE.replace("127.0.0.1:11113", destination_address) + TUNNEL
}

#[test]
fn tunnel_defaults_and_routing() {
    let c = Config::parse(&with_tunnel("10.8.0.1:104")).expect("tunnel config loads");
    let t = c.tunnel.expect("tunnel section");
    assert_eq!(t.interface, "kk0");
    assert_eq!(t.mtu, 1420);
    assert_eq!(t.listen_port, 51820);
    assert_eq!(t.handshake_timeout, Duration::from_secs(150));
    assert_eq!(t.peer.persistent_keepalive, Duration::from_secs(25));
    assert_eq!(t.peer.public_key[0], 0xc5);
    assert!(
        c.destinations[0].via_tunnel,
        "a tunnel makes destinations go through it"
    );
    assert!(
        !Config::parse(ISSUE_EXAMPLE)
            .expect("no tunnel")
            .destinations[0]
            .via_tunnel
    );
}

#[test]
fn tunnel_errors_name_the_key() {
    // A destination outside the tunnel would send patient data in the clear.
    let e = err(&with_tunnel("192.0.2.7:104"));
    assert!(
        e.contains("destinations[0].address") && e.contains("allowed_ips"),
        "{e}"
    );
    let direct = with_tunnel("192.0.2.7:104").replace(
        "address = \"192.0.2.7:104\"",
        "address = \"192.0.2.7:104\"\nroute = \"direct\"",
    );
    assert!(
        !Config::parse(&direct)
            .expect("explicitly direct")
            .destinations[0]
            .via_tunnel
    );
    let e = err(&with_tunnel("10.8.0.1:104").replace("xTIBA5rbo", "xTIBA5"));
    assert!(
        e.contains("tunnel.peer.public_key") && e.contains("wg pubkey"),
        "{e}"
    );
    let e = err(&with_tunnel("10.8.0.1:104").replace("\"kk0\"", "\"a-very-long-interface\""));
    assert!(e.contains("tunnel.interface"), "{e}");
    let e = err(&with_tunnel("10.8.0.1:104").replace("wg.center.example:51820", "wg.center"));
    assert!(e.contains("tunnel.peer.endpoint"), "{e}");
    let e = err(&with_tunnel("10.8.0.1:104").replace("[tunnel.peer]", "mtu = 600\n[tunnel.peer]"));
    assert!(e.contains("tunnel.mtu"), "{e}");
    let e = err(&with_tunnel("10.8.0.1:104").replace("address = [", "adress = ["));
    assert!(e.contains("adress"), "{e}");
    // Above the session lifetime nothing would re-resolve before it dies.
    let e = err(&with_tunnel("10.8.0.1:104").replace(
        "[tunnel.peer]",
        "handshake_timeout = \"300s\"\n[tunnel.peer]",
    ));
    assert!(
        e.contains("tunnel.handshake_timeout") && e.contains("180 s"),
        "{e}"
    );
    let e = err(&ISSUE_EXAMPLE.replace(
        "address = \"127.0.0.1:11113\"",
        "address = \"127.0.0.1:11113\"\nroute = \"tunnel\"",
    ));
    assert!(e.contains("destinations[0].route"), "{e}");
}

#[test]
fn a_name_is_checked_against_the_tunnel_once_resolved() {
    let c = Config::parse(&with_tunnel("pacs.center.example:104")).expect("a name loads");
    let d = &c.destinations[0];
    let inside: std::net::IpAddr = "10.8.0.1".parse().expect("ip");
    let outside: std::net::IpAddr = "203.0.113.9".parse().expect("ip");
    assert_eq!(d.leaves_tunnel(c.tunnel.as_ref(), &[inside]), None);
    let why = d
        .leaves_tunnel(c.tunnel.as_ref(), &[inside, outside])
        .expect("one address outside is enough to refuse");
    assert!(
        why.contains("203.0.113.9")
            && why.contains("10.8.0.0/24")
            && why.contains("route = \"direct\""),
        "{why}"
    );
    let direct = Config::parse(&with_tunnel("pacs.center.example:104").replace(
        "name = \"reading-center\"",
        "name = \"reading-center\"\nroute = \"direct\"",
    ))
    .expect("direct");
    assert_eq!(
        direct.destinations[0].leaves_tunnel(direct.tunnel.as_ref(), &[outside]),
        None,
        "a direct destination is not the tunnel's"
    );
}

#[test]
fn the_appliance_network_is_parsed_and_checked() {
    let net = "\n[network]\ndns = [\"192.0.2.53\"]\n[network.lan]\ninterface = \"enp0s3\"\naddress = \"192.0.2.1/24\"\n[network.wan]\ninterface = \"enp0s4\"\naddress = \"dhcp\"\n";
    let c = Config::parse(&(with_tunnel("10.8.0.1:104") + net)).expect("network loads");
    let n = c.network.expect("network");
    assert_eq!(
        n.lan.address.map(|a| a.to_string()).as_deref(),
        Some("192.0.2.1/24")
    );
    assert_eq!(n.wan.address, None, "dhcp");
    assert!(
        c.tunnel.expect("tunnel").link_by_system,
        "the image makes the TUN"
    );
    let e = err(&(with_tunnel("10.8.0.1:104") + &net.replace("enp0s4", "enp0s3")));
    assert!(e.contains("network.wan.interface"), "{e}");
    let e = err(&(with_tunnel("10.8.0.1:104") + &net.replace("192.0.2.1/24", "192.0.2.1")));
    assert!(
        e.contains("network.lan.address") && e.contains("prefix"),
        "{e}"
    );
    let e = err(&(with_tunnel("10.8.0.1:104") + &net.replace("\"enp0s3\"", "\"kk0\"")));
    assert!(e.contains("tunnel.interface"), "{e}");
    assert!(
        !Config::parse(&with_tunnel("10.8.0.1:104"))
            .expect("no network")
            .tunnel
            .expect("t")
            .link_by_system
    );
}

const RESULTS_EXAMPLE: &str = r#"
[dicom]
ae_title = "KAKEHASHI"
listen = "127.0.0.1:11112"

[[dicom.sources]]
ae_title = "HOSPITALPACS"

[pacs]
ae_title = "HOSPITALPACS"
address = "127.0.0.1:4242"

[[destinations]]
name = "reading-center"
ae_title = "READCENTER"
address = "127.0.0.1:11113"
route = "direct"

[results]
listen = "127.0.0.1:11114"
ae_title = "KAKEHASHI"
from = ["READCENTER"]

[spool]
dir = "/var/lib/kakehashi/spool"
max_size = "50 GiB"
"#;

#[test]
fn pacs_and_results_mean_what_they_say() {
    let c = Config::parse(RESULTS_EXAMPLE).expect("the results example must load");
    let pacs = c.pacs.expect("[pacs]");
    assert_eq!(pacs.name, PACS_DESTINATION);
    assert_eq!(pacs.ae_title.as_str(), "HOSPITALPACS");
    assert_eq!(pacs.address, "127.0.0.1:4242");
    assert_eq!(pacs.calling_ae_title.as_str(), "KAKEHASHI");
    assert!(!pacs.via_tunnel);
    let r = c.results.expect("[results]");
    assert_eq!(r.listen, "127.0.0.1:11114".parse().expect("addr"));
    assert_eq!(r.ae_title.as_str(), "KAKEHASHI");
    assert_eq!(r.from, vec![AeTitle("READCENTER".into())]);
    assert!(r
        .sop_classes
        .contains(&"1.2.840.10008.5.1.4.1.1.104.1".to_string()));
    assert!(r
        .sop_classes
        .contains(&"1.2.840.10008.5.1.4.1.1.88.33".to_string()));
    assert!(!r
        .sop_classes
        .contains(&"1.2.840.10008.5.1.4.1.1.2".to_string()));
}

#[test]
fn results_errors_name_the_key() {
    let no_pacs = RESULTS_EXAMPLE.replace(
        "[pacs]\nae_title = \"HOSPITALPACS\"\naddress = \"127.0.0.1:4242\"\n",
        "",
    );
    assert!(err(&no_pacs).contains("`results`"), "{}", err(&no_pacs));
    let no_from = RESULTS_EXAMPLE.replace("from = [\"READCENTER\"]", "from = []");
    assert!(err(&no_from).contains("`results.from`"));
    let same_port = RESULTS_EXAMPLE.replace("127.0.0.1:11114", "127.0.0.1:11112");
    assert!(err(&same_port).contains("`results.listen`"));
    let bad_uid = RESULTS_EXAMPLE.replace(
        "from = [\"READCENTER\"]",
        "from = [\"READCENTER\"]\nextra_sop_classes = [\"1.2.03\"]",
    );
    assert!(err(&bad_uid).contains("`results.extra_sop_classes[0]`"));
    let extra = RESULTS_EXAMPLE.replace(
        "from = [\"READCENTER\"]",
        "from = [\"READCENTER\"]\nextra_sop_classes = [\"1.2.840.10008.5.1.4.1.1.11.1\"]",
    );
    let c = Config::parse(&extra).expect("extra class");
    assert!(c
        .results
        .expect("results")
        .sop_classes
        .contains(&"1.2.840.10008.5.1.4.1.1.11.1".to_string()));
    let missing = RESULTS_EXAMPLE.replace(
        "from = [\"READCENTER\"]",
        "from = [\"READCENTER\"]\ntrusted_signers = [\"/nonexistent/center.pem\"]",
    );
    let e = err(&missing);
    assert!(
        e.contains("`results.trusted_signers[0]`") && e.contains("/nonexistent/center.pem"),
        "{e}"
    );
    let relative = RESULTS_EXAMPLE.replace(
        "from = [\"READCENTER\"]",
        "from = [\"READCENTER\"]\ntrusted_signers = [\"center.pem\"]",
    );
    assert!(
        err(&relative).contains("absolute path"),
        "{}",
        err(&relative)
    );
    let hl7 = RESULTS_EXAMPLE.replace(
        "from = [\"READCENTER\"]",
        "from = [\"READCENTER\"]\n[results.hl7]\nris = \"ris 2575\"",
    );
    assert!(err(&hl7).contains("`results.hl7.ris`"), "{}", err(&hl7));
    let unknown = RESULTS_EXAMPLE.replace("from = [", "senders = [");
    assert!(err(&unknown).contains("senders"));
    let reserved = RESULTS_EXAMPLE.replace("name = \"reading-center\"", "name = \"pacs\"");
    assert!(err(&reserved).contains("`destinations[0].name`"));
    let pacs_addr = RESULTS_EXAMPLE.replace("127.0.0.1:4242", "pacs");
    assert!(err(&pacs_addr).contains("`pacs.address`"));
}

const URGENT: &str = r#"
[urgent]
ack_within = "10m"

[urgent.email]
relay = "127.0.0.1:2525"
from = "kakehashi@hospital.example"
to = ["referrers@hospital.example"]
escalate_to = ["head@hospital.example"]
"#;

#[test]
fn urgent_findings_are_mailed_and_escalated() {
    let c = Config::parse(&format!("{RESULTS_EXAMPLE}{URGENT}")).expect("urgent loads");
    let u = c.urgent.expect("[urgent]");
    assert_eq!(u.ack_within, Duration::from_secs(600));
    assert!(u.hl7.is_none());
    let email = u.email.expect("[urgent.email]");
    assert_eq!(email.relay, "127.0.0.1:2525");
    assert_eq!(email.to, vec!["referrers@hospital.example".to_string()]);
    assert_eq!(email.escalate_to, vec!["head@hospital.example".to_string()]);
    assert_eq!(email.timeout, Duration::from_secs(30));
    let default = URGENT.replace("ack_within = \"10m\"\n", "");
    let c = Config::parse(&format!("{RESULTS_EXAMPLE}{default}")).expect("default");
    assert_eq!(
        c.urgent.expect("urgent").ack_within,
        Duration::from_secs(900)
    );

    let with = |from: &str, to: &str| format!("{RESULTS_EXAMPLE}{}", URGENT.replace(from, to));
    assert!(err(&with("127.0.0.1:2525", "mailhost")).contains("`urgent.email.relay`"));
    assert!(
        err(&with("\"kakehashi@hospital.example\"", "\"kakehashi\""))
            .contains("`urgent.email.from`")
    );
    assert!(err(&with(
        "[\"referrers@hospital.example\"]",
        "[\"a@b\", \"x>@evil\\r\\nRCPT TO:<y@z\"]"
    ))
    .contains("`urgent.email.to[1]`"));
    assert!(
        err(&with("to = [\"referrers@hospital.example\"]", "to = []"))
            .contains("`urgent.email.to`")
    );
    assert!(
        err(&with("ack_within = \"10m\"", "ack_within = \"0s\"")).contains("`urgent.ack_within`")
    );
    assert!(err(&with("[urgent.email]", "[urgent.mail]")).contains("mail"));
    let no_results = format!(
        "{}{URGENT}",
        RESULTS_EXAMPLE.replace(
            "[results]\nlisten = \"127.0.0.1:11114\"\nae_title = \"KAKEHASHI\"\nfrom = [\"READCENTER\"]\n",
            ""
        )
    );
    assert!(
        err(&no_results).contains("`urgent`"),
        "{}",
        err(&no_results)
    );

    // HL7 instead of (or with) e-mail.
    let hl7 = "[urgent]\n[urgent.hl7]\nris = \"127.0.0.1:2575\"\n";
    let c = Config::parse(&format!("{RESULTS_EXAMPLE}{hl7}")).expect("hl7 only");
    let h = c.urgent.expect("urgent").hl7.expect("hl7");
    assert_eq!(
        (
            h.ris.as_str(),
            h.sending_application.as_str(),
            h.receiving_application.as_str()
        ),
        ("127.0.0.1:2575", "KAKEHASHI", "RIS")
    );
    let bad_name = format!("{RESULTS_EXAMPLE}{hl7}receiving_facility = \"A|B\"\n");
    assert!(err(&bad_name).contains("`urgent.hl7.receiving_facility`"));
    let coded = format!("{RESULTS_EXAMPLE}[urgent]\ncodes = [\"SCT:36118008\"]\n[urgent.hl7]\nris = \"127.0.0.1:2575\"\n");
    assert_eq!(
        Config::parse(&coded)
            .expect("codes")
            .urgent
            .expect("urgent")
            .codes,
        vec!["SCT:36118008".to_string()]
    );
    assert!(err(&coded.replace("SCT:36118008", "36118008")).contains("`urgent.codes[0]`"));
    let no_channel = format!("{RESULTS_EXAMPLE}[urgent]\nack_within = \"5m\"\n");
    assert!(
        err(&no_channel).contains("`urgent`"),
        "{}",
        err(&no_channel)
    );
}

#[test]
fn priors_retrieve_by_move_or_get() {
    let with = |v: &str| format!("{RESULTS_EXAMPLE}\n[priors]\nretrieve = \"{v}\"\n");
    let c = Config::parse(&with("get")).expect("get");
    assert!(c.priors.expect("priors").get);
    let c = Config::parse(&with("move")).expect("move");
    assert!(!c.priors.expect("priors").get);
    let e = err(&with("ftp"));
    assert!(
        e.contains("`priors.retrieve`") && e.contains("\"get\""),
        "{e}"
    );
}

#[test]
fn metrics_listen_on_the_hospital_side_only() {
    let m = |listen: &str| format!("\n[metrics]\nlisten = \"{listen}\"\n");
    assert_eq!(
        Config::parse(ISSUE_EXAMPLE).expect("no metrics").metrics,
        None
    );
    let c = Config::parse(&(with_tunnel("10.8.0.1:104") + &m("192.168.1.20:9102")))
        .expect("a LAN address loads");
    assert_eq!(
        c.metrics.expect("metrics").listen.to_string(),
        "192.168.1.20:9102"
    );
    for (bad, says) in [
        ("10.8.0.2:9102", "tunnel"),
        ("10.8.0.7:9102", "tunnel"),
        ("0.0.0.0:9102", "every address includes the tunnel"),
        ("127.0.0.1:11112", "a port of its own"),
        ("localhost:9102", "an IP address and port"),
    ] {
        let e = err(&(with_tunnel("10.8.0.1:104") + &m(bad)));
        assert!(
            e.contains("metrics.listen") && e.contains(says),
            "{bad}: {e}"
        );
    }
    // On the appliance its firewall keeps the port to the LAN; the WAN's
    // own address is still refused.
    let net = "\n[network]\n[network.lan]\ninterface = \"enp0s3\"\naddress = \"192.0.2.1/24\"\n[network.wan]\ninterface = \"enp0s4\"\naddress = \"198.51.100.7/24\"\n";
    let c = Config::parse(&(with_tunnel("10.8.0.1:104") + net + &m("0.0.0.0:9102")))
        .expect("any address behind the appliance's firewall");
    assert!(c.metrics.is_some());
    let e = err(&(with_tunnel("10.8.0.1:104") + net + &m("198.51.100.7:9102")));
    assert!(e.contains("network.wan"), "{e}");
    let e = err(&(ISSUE_EXAMPLE.to_string() + "\n[metrics]\nport = 9102\n"));
    assert!(e.contains("port") || e.contains("listen"), "{e}");
}
