//! The whole path in network namespaces: hospital → box → WireGuard tunnel
//! → reading center, with DCMTK at both ends and wireguard-go as the
//! center's hub. The box's side of the tunnel is kakehashid's own boringtun.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kakehashi_control::StatusReport;
use kakehashi_systest::netns::*;
use kakehashi_systest::testdata;
use kakehashi_systest::*;

const CENTER_DICOM_PORT: u16 = 11113;

use testdata::ct_study as study;

/// kakehashid in the box namespace, forwarding to the center's tunnel address.
fn box_relay(site: &Site, center_public: &str, handshake_timeout: &str) -> Relay {
    box_relay_with(site, center_public, handshake_timeout, Vec::new())
}

fn box_relay_with(
    site: &Site,
    center_public: &str,
    handshake_timeout: &str,
    env: Vec<(String, String)>,
) -> Relay {
    let mut opts = box_options(site, center_public, handshake_timeout);
    opts.env = env;
    Relay::start(opts)
}

fn box_options(site: &Site, center_public: &str, handshake_timeout: &str) -> RelayOptions {
    let mut opts = RelayOptions::to(CENTER_DICOM_PORT);
    // The hospital's PACS may send, from its own address only.
    opts.extra_sources =
        format!("\n[[dicom.sources]]\nae_title = \"HOSPITALPACS\"\naddress = \"{HOSPITAL_IP}\"\n");
    opts.netns = Some(site.boxns.name().to_string());
    opts.listen_host = BOX_LAN_IP.into();
    opts.dest_host = CENTER_TUNNEL_IP.into();
    opts.extra_toml = site.tunnel_toml(center_public, handshake_timeout);
    opts
}

fn center_scp(site: &Site) -> StoreScp {
    StoreScp::start_ns(
        CENTER_DICOM_PORT,
        &std::env::temp_dir(),
        Some(site.center.name()),
    )
}

/// Every sent file arrived at the center with an identical dataset.
fn assert_identical(sent: &[PathBuf], scp: &StoreScp) {
    let mut by_uid: HashMap<String, Vec<u8>> = HashMap::new();
    for f in scp.files() {
        let bytes = read(&f);
        let uid = sop_instance_of_file(&bytes).expect("received file has a SOP Instance UID");
        by_uid.insert(uid, bytes);
    }
    for f in sent {
        let original = read(f);
        let uid = sop_instance_of_file(&original).expect("uid");
        let got = by_uid
            .get(&uid)
            .unwrap_or_else(|| panic!("{uid} did not arrive at the center"));
        assert!(
            testdata::dataset_of_file(got) == testdata::dataset_of_file(&original),
            "{uid}: the dataset changed on the way"
        );
    }
}

fn tunnel_of(s: &StatusReport) -> kakehashi_control::TunnelStatus {
    s.tunnel.clone().expect("status has a tunnel section")
}

fn wait_arrived(scp: &StoreScp, n: usize, timeout: Duration) {
    wait_until("every instance to reach the center", timeout, || {
        scp.files().len() >= n
    });
}

#[test]
fn study_crosses_the_tunnel_byte_identical_and_wg_show_tells_the_truth() {
    let site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = study(data.path(), "tunnel", 12, 256 * 1024);
    let scp = center_scp(&site);
    // systemd's notify socket, as the test sees it.
    let notify_path = site.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind notify");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let relay = box_relay_with(
        &site,
        &site.center_public,
        "150s",
        vec![
            ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
            ("WATCHDOG_USEC".into(), "2000000".into()),
        ],
    );

    let out = send_from_hospital(&site, &relay, &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);
    relay.wait_drained(Duration::from_secs(60));
    wait_arrived(&scp, files.len(), Duration::from_secs(30));
    assert_identical(&files, &scp);
    assert_eq!(scp.store_requests(), files.len(), "nothing sent twice");

    // The supervisor polls every second.
    wait_until(
        "the byte counters to catch up",
        Duration::from_secs(5),
        || tunnel_of(&relay.status()).tx_bytes > 12 * 256 * 1024,
    );
    let t = tunnel_of(&relay.status());
    assert!(t.up, "{t:?}");
    assert_eq!(t.public_key, site.box_public);
    assert_eq!(t.endpoint.as_deref(), Some("198.51.100.2:51820"));
    assert!(t.rx_bytes > 0, "{t:?}");
    let text = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).to_string();
    assert!(
        text.contains(&format!("tunnel {}: up", site.box_interface)),
        "{text}"
    );

    // `wg show` on the box: boringtun's own UAPI answer would print
    // "latest handshake: 56 years ago" and no interface key.
    let show = site.wg_show(true);
    println!("wg show on the box:\n{show}");
    assert!(
        show.contains(&format!("public key: {}", site.box_public)),
        "{show}"
    );
    assert!(show.contains("private key: (hidden)"), "{show}");
    assert!(
        show.contains(&format!("peer: {}", site.center_public)),
        "{show}"
    );
    assert!(
        show.contains("latest handshake:")
            && show.contains("seconds ago")
            && !show.contains("years"),
        "{show}"
    );
    // The box's tunnel settings come from its config only.
    let set = ns_command(Some(site.boxns.name()), "wg")
        .args(["set", &site.box_interface, "listen-port", "1"])
        .output()
        .expect("wg set");
    assert!(!set.status.success(), "wg set must be refused");
    let mtu =
        run(ns_command(Some(site.boxns.name()), "ip").args(["link", "show", &site.box_interface]));
    assert!(mtu.contains("mtu 1420"), "{mtu}");

    // systemd heard READY, a STATUS naming the tunnel, and the watchdog.
    let mut heard = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline
        && !(heard.contains("READY=1")
            && heard.contains("STATUS=tunnel up")
            && heard.contains("WATCHDOG=1"))
    {
        if let Ok(n) = notify.recv(&mut buf) {
            heard.push_str(&String::from_utf8_lossy(&buf[..n]));
            heard.push('\n');
        }
    }
    assert!(heard.contains("READY=1"), "{heard}");
    assert!(heard.contains("STATUS=tunnel up"), "{heard}");
    assert!(heard.contains("WATCHDOG=1"), "{heard}");
}

#[test]
fn nothing_on_the_lan_reaches_the_center() {
    let site = Site::new();
    let _scp = center_scp(&site);
    let relay = box_relay(&site, &site.center_public, "150s");
    wait_until("the tunnel to come up", Duration::from_secs(30), || {
        tunnel_of(&relay.status()).up
    });
    let h = Some(site.hospital.name());
    // Positive control: the hospital reaches the box itself.
    let ok = echoscu_at(h, BOX_LAN_IP, relay.port, "MODALITY1", "KAKEHASHI");
    assert!(ok.status.success(), "C-ECHO to the box: {ok:?}");
    // The box reaches the center through the tunnel.
    let ok = echoscu_at(
        Some(site.boxns.name()),
        CENTER_TUNNEL_IP,
        CENTER_DICOM_PORT,
        "KAKEHASHI",
        "READCENTER",
    );
    assert!(
        ok.status.success(),
        "C-ECHO from the box through the tunnel: {ok:?}"
    );
    // The hospital reaches neither the center's tunnel address nor its WAN address.
    for target in [CENTER_TUNNEL_IP, CENTER_WAN_IP] {
        let out = echoscu_at(h, target, CENTER_DICOM_PORT, "MODALITY1", "READCENTER");
        assert!(
            !out.status.success(),
            "the hospital reached the center at {target}: {out:?}"
        );
        let ping = ns_command(h, "ping")
            .args(["-c", "2", "-W", "1", target])
            .output()
            .expect("ping");
        assert!(!ping.status.success(), "ping from the LAN reached {target}");
    }
}

#[test]
fn wan_cut_during_a_transfer_then_restored() {
    let site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = study(data.path(), "cut", 60, 128 * 1024);
    let scp = center_scp(&site);
    let relay = box_relay(&site, &site.center_public, "150s");
    // Slow the link so the cut lands mid-transfer.
    site.limit_rate("20mbit");
    let out = send_from_hospital(&site, &relay, &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);
    wait_until("the transfer to start", Duration::from_secs(30), || {
        !scp.files().is_empty()
    });

    site.wan(false);
    let cut = Instant::now();
    let arrived_at_cut = scp.files().len();
    // The session stays valid for up to 3 minutes, but nothing comes back:
    // the supervisor calls the tunnel down and the destination pauses.
    wait_until(
        "the tunnel to be seen down and the destination paused",
        Duration::from_secs(75),
        || {
            let s = relay.status();
            !tunnel_of(&s).up && s.destinations[0].state == "paused"
        },
    );
    let noticed = cut.elapsed();
    let s = relay.status();
    assert!(
        tunnel_of(&s)
            .problem
            .unwrap_or_default()
            .contains("nothing received"),
        "{s:?}"
    );
    assert!(s.destinations[0].queued > 0, "{s:?}");
    assert_eq!(
        s.destinations[0].dead_letter, 0,
        "a cut dead-letters nothing"
    );
    // Paused: nothing is tried (and so nothing burnt) meanwhile.
    let failures = s.destinations[0].connect_failures;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(relay.status().destinations[0].connect_failures, failures);
    let before = tunnel_of(&relay.status()).handshakes;

    let restored = Instant::now();
    site.wan(true);
    wait_until(
        "a handshake within 30 s of the link coming back",
        Duration::from_secs(30),
        || tunnel_of(&relay.status()).handshakes > before,
    );
    let took = restored.elapsed();
    println!(
        "WAN cut {:.0} s with {arrived_at_cut}/{} arrived; seen down after {:.1} s; restore → next handshake: {:.1} s",
        (restored - cut).as_secs_f64(),
        files.len(),
        noticed.as_secs_f64(),
        took.as_secs_f64()
    );
    site.clear_rate();
    wait_arrived(&scp, files.len(), Duration::from_secs(120));
    relay.wait_drained(Duration::from_secs(30));
    assert_identical(&files, &scp);
    let s = relay.status();
    assert_eq!(s.destinations[0].dead_letter, 0);
    drop(site);
}

#[test]
fn a_large_instance_outlasts_the_response_timeout_on_a_slow_link_and_a_silent_center_does_not() {
    // 4 MiB over 1 Mbit/s takes ~35 s, with a response timeout of 3 s:
    // socket buffers hold ~900 KB here, 7 s of this link, so a write waits
    // for room, and the tail of the instance waits to leave, longer than
    // the timeout while the link is busy. Time without progress
    // is what times out, so it arrives at the first attempt; a center
    // that stops reading (SIGSTOP) is still given up on.
    let site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let big = study(data.path(), "slowlink", 1, 4 << 20);
    let scp = center_scp(&site);
    let mut opts = box_options(&site, &site.center_public, "150s");
    opts.response_timeout = "3s".into();
    opts.associations = Some(1);
    let relay = Relay::start(opts);
    site.limit_rate("1mbit");
    let out = send_from_hospital(&site, &relay, &big);
    assert_eq!(out.acked.len(), 1, "{}", out.output);
    let started = Instant::now();
    relay.wait_drained(Duration::from_secs(180));
    let took = started.elapsed();
    let d = relay.status().destinations[0].clone();
    assert_eq!(d.last_error, None, "{d:?}");
    assert_eq!(scp.store_requests(), 1, "one C-STORE, no re-send");
    assert_identical(&big, &scp);
    println!("4 MiB over 1 Mbit/s with a 3 s response timeout: delivered in {took:.1?}");

    // The center freezes in the middle of the next instance: the box gives
    // up within the response timeout of the last byte the center took.
    let more = study(data.path(), "frozen", 1, 2 << 20);
    let out = send_from_hospital(&site, &relay, &more);
    assert_eq!(out.acked.len(), 1, "{}", out.output);
    wait_until("the transfer to start", Duration::from_secs(30), || {
        relay.status().destinations[0].in_flight > 0
    });
    scp.freeze(true);
    wait_until("the attempt to time out", Duration::from_secs(60), || {
        relay.status().destinations[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no answer"))
    });
    let d = relay.status().destinations[0].clone();
    assert_eq!((d.queued, d.dead_letter), (1, 0), "{d:?}");
    scp.freeze(false);
    drop(scp);
    site.clear_rate();
    let scp = center_scp(&site);
    relay.wait_drained(Duration::from_secs(120));
    assert_identical(&more, &scp);
    drop(site);
}

#[test]
fn lossy_slow_link_everything_arrives() {
    let mut site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = study(data.path(), "lossy", 6, 24 * 1024);
    let scp = center_scp(&site);
    site.impair(0.20, Duration::from_millis(200));
    let relay = box_relay(&site, &site.center_public, "150s");
    let started = Instant::now();
    let out = send_from_hospital(&site, &relay, &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);
    wait_arrived(&scp, files.len(), Duration::from_secs(300));
    relay.wait_drained(Duration::from_secs(60));
    println!(
        "loss 20%, delay 200 ms each way (userspace impairment, see Site::impair): {} instances arrived in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    assert_identical(&files, &scp);
    assert_eq!(relay.status().destinations[0].dead_letter, 0);
}

#[test]
fn center_moves_to_a_new_address_behind_the_same_name() {
    let mut site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let first = study(data.path(), "before", 3, 32 * 1024);
    let second = study(data.path(), "after", 5, 32 * 1024);
    let scp = center_scp(&site);
    // A short handshake timeout keeps the test short; 150 s in the field.
    let relay = box_relay(&site, &site.center_public, "10s");
    send_from_hospital(&site, &relay, &first);
    wait_arrived(&scp, first.len(), Duration::from_secs(60));

    // The center's WireGuard restarts on a new address; DNS follows.
    site.stop_center_wireguard();
    site.move_center(CENTER_MOVED_IP);
    site.start_center_wireguard();
    let out = send_from_hospital(&site, &relay, &second);
    assert_eq!(out.acked.len(), second.len(), "{}", out.output);

    let moved = Instant::now();
    wait_arrived(&scp, first.len() + second.len(), Duration::from_secs(150));
    println!(
        "center moved to {CENTER_MOVED_IP}: the box followed in {:.1} s",
        moved.elapsed().as_secs_f64()
    );
    let t = tunnel_of(&relay.status());
    assert_eq!(t.endpoint.as_deref(), Some("198.51.100.3:51820"), "{t:?}");
    assert!(
        relay.log_text().contains("now resolves to 198.51.100.3"),
        "{}",
        relay.log_text()
    );
    assert_identical(&second, &scp);
}

#[test]
fn wrong_center_key_is_explained_and_nothing_is_dead_lettered() {
    let site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = study(data.path(), "wrongkey", 4, 16 * 1024);
    let _scp = center_scp(&site);
    // A valid key that is not the center's.
    let wrong = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    let relay = box_relay(&site, wrong, "150s");
    let out = send_from_hospital(&site, &relay, &files);
    assert_eq!(
        out.acked.len(),
        files.len(),
        "the box still accepts: {}",
        out.output
    );

    wait_until("the log to explain", Duration::from_secs(40), || {
        relay.log_text().contains("no handshake with peer")
    });
    let s = relay.status();
    let t = tunnel_of(&s);
    assert!(!t.up, "{t:?}");
    let problem = t.problem.clone().unwrap_or_default();
    assert!(
        problem.contains(&format!("no handshake with peer {wrong}")) && problem.contains(" s "),
        "{problem}"
    );
    let d = &s.destinations[0];
    assert_eq!(d.state, "paused", "{d:?}");
    assert_eq!(d.queued, files.len() as u64);
    assert_eq!(d.dead_letter, 0);
    let text = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).to_string();
    assert!(
        text.contains("DOWN") && text.contains("no handshake with peer"),
        "{text}"
    );
    println!("{text}");
}

#[test]
fn the_hospital_pacs_pushes_a_study_through_the_tunnel() {
    let site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = study(data.path(), "pacs", 8, 64 * 1024);
    let scp = center_scp(&site);
    let relay = box_relay(&site, &site.center_public, "150s");
    // Orthanc as the hospital's PACS, in the hospital namespace, knowing the box.
    let pacs = Orthanc::start_as(
        Some(site.hospital.name()),
        "HOSPITALPACS",
        serde_json::json!({ "box": ["KAKEHASHI", BOX_LAN_IP, relay.port] }),
    );
    let ids: Vec<String> = files.iter().map(|f| pacs.upload(f)).collect();
    let answer = pacs
        .send_to("box", &ids)
        .expect("Orthanc's C-STORE job to the box");
    println!("Orthanc → box: {answer}");
    wait_arrived(&scp, files.len(), Duration::from_secs(60));
    relay.wait_drained(Duration::from_secs(30));
    assert_identical(&files, &scp);
    let audit =
        String::from_utf8_lossy(&relay.cli(&["audit", "--limit", "1000"]).stdout).to_string();
    assert!(audit.contains("HOSPITALPACS"), "{audit}");
}

#[test]
fn a_destination_name_that_resolves_outside_the_tunnel_gets_nothing() {
    // Two destinations given by DNS name: pacs.center.test resolves to the
    // center's tunnel address; wan.center.test to its WAN address, where a
    // DICOM node listens too. Only a literal address can be checked when the
    // config loads, so the box checks every resolved address at connect
    // time: the second destination is refused, shown and audited, and never
    // receives a byte; nothing is dead-lettered.
    const LEAKY_PORT: u16 = 11114;
    let site = Site::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = study(data.path(), "names", 4, 16 * 1024);
    let scp = center_scp(&site);
    let leaky = StoreScp::start_ns(LEAKY_PORT, &std::env::temp_dir(), Some(site.center.name()));
    let mut opts = RelayOptions::to(CENTER_DICOM_PORT);
    opts.netns = Some(site.boxns.name().to_string());
    opts.listen_host = BOX_LAN_IP.into();
    opts.dest_host = CENTER_PACS_NAME.into();
    opts.extra_toml = site.tunnel_toml(&site.center_public, "150s")
        + &format!(
            "\n[[destinations]]\nname = \"leaky\"\nae_title = \"READCENTER\"\naddress = \"{CENTER_WAN_NAME}:{LEAKY_PORT}\"\nconnect_timeout = \"2s\"\n"
        );
    let relay = Relay::start(opts);

    let out = send_from_hospital(&site, &relay, &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);
    wait_arrived(&scp, files.len(), Duration::from_secs(60));
    assert_identical(&files, &scp);
    wait_until(
        "the refusal to show in status",
        Duration::from_secs(30),
        || {
            relay.status().destinations[1]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("outside the tunnel"))
        },
    );
    // Several retries later: still nothing there, nothing dead-lettered.
    std::thread::sleep(Duration::from_secs(3));
    let d = relay.status().destinations[1].clone();
    assert_eq!(d.queued, files.len() as u64, "{d:?}");
    assert_eq!(d.dead_letter, 0);
    let why = d.last_error.unwrap_or_default();
    assert!(
        why.contains(CENTER_WAN_IP) && why.contains("10.8.0.0/24"),
        "{why}"
    );
    assert_eq!(leaky.store_requests(), 0);
    assert!(
        !std::fs::read_to_string(&leaky.log)
            .unwrap_or_default()
            .contains("Association Acknowledged"),
        "not even an association was made over the WAN"
    );
    let audit = relay.audit();
    let refusals: Vec<_> = audit
        .iter()
        .filter(|a| a.event == kakehashi_control::AuditEvent::OutsideTunnel)
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "audited once, not at every retry: {refusals:?}"
    );
    assert_eq!(refusals[0].destination.as_deref(), Some("leaky"));
}

#[test]
fn a_resolver_that_never_answers_does_not_stall_the_supervisor_or_the_watchdog() {
    // The center's endpoint is a DNS name, and the box's nameserver does
    // not answer (a WAN outage takes DNS with it): each lookup would hang
    // for a minute. The supervisor gives up after 5 s, says so, and keeps
    // feeding the systemd watchdog.
    let site = Site::new();
    // A nameserver on the center's WAN address that reads queries and never
    // answers (a refused port would fail fast; silence is what hangs).
    let silent = in_netns(site.center.name(), || {
        std::net::UdpSocket::bind((CENTER_WAN_IP, 53)).expect("bind a silent nameserver")
    });
    let _drain = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while silent.recv(&mut buf).is_ok() {}
    });
    site.set_box_resolver(&format!(
        "nameserver {CENTER_WAN_IP}\noptions timeout:30 attempts:2\n"
    ));
    let notify_path = site.dir.path().join("notify-dns.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind notify");
    notify
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut opts = RelayOptions::to(CENTER_DICOM_PORT);
    opts.netns = Some(site.boxns.name().to_string());
    opts.listen_host = BOX_LAN_IP.into();
    opts.dest_host = CENTER_TUNNEL_IP.into();
    opts.extra_toml = site
        .tunnel_toml(&site.center_public, "10s")
        .replace(CENTER_NAME, "center-by-dns.example");
    opts.env = vec![
        ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "6000000".into()),
    ];
    let relay = Relay::start(opts);

    // 45 s of watchdog pings, never more than the 6 s interval apart.
    let start = Instant::now();
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(45) {
        if let Ok(n) = notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
        }
    }
    longest = longest.max(last.elapsed());
    assert!(
        longest < Duration::from_secs(6),
        "the watchdog went unfed for {longest:?}:\n{}",
        relay.log_text()
    );
    let t = tunnel_of(&relay.status());
    let problem = t.problem.unwrap_or_default();
    assert!(
        !t.up && problem.contains("no answer from the resolver within 5 s"),
        "{problem}"
    );
    assert!(!relay
        .log_text()
        .contains("not feeding the systemd watchdog"));
}
