//! The daemon as systemd and a field engineer meet it: exit codes, clean
//! stops, and more than one destination.

use std::process::Command;
use std::time::Duration;

use kakehashi_systest::testdata::{self, Name, Syntax};
use kakehashi_systest::*;

#[test]
fn a_bad_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good =
        std::fs::read_to_string(workspace_root().join("examples/minimal.toml")).expect("example");
    let ok = Command::new(bin("kakehashid"))
        .arg("--check-config")
        .arg("--config")
        .arg(workspace_root().join("examples/minimal.toml"))
        .output()
        .expect("run");
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid"));

    for (bad, needle) in [
        (
            good.replace(
                "max_size = \"50 GiB\"",
                "max_size = \"50 GiB\"\nmax_sise = \"1 GiB\"",
            ),
            "max_sise",
        ),
        (
            good.replace("\"127.0.0.1:11113\"", "\"center-without-port\""),
            "destinations[0].address",
        ),
        (
            good.replace("ae_title = \"MODALITY1\"", "ae_title = \"\""),
            "dicom.sources[0].ae_title",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, bad).expect("write");
        let out = Command::new(bin("kakehashid"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(78),
            "configuration errors exit 78 (systemd: do not restart)"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "the message names {needle}: {err}");
    }
    let missing = Command::new(bin("kakehashid"))
        .args(["--config", "/nonexistent/kakehashi.toml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/kakehashi.toml"));
}

#[test]
fn sigterm_stops_cleanly_and_a_second_daemon_is_refused() {
    let center = StoreScp::start(free_port());
    let mut relay = Relay::start(RelayOptions::to(center.port));
    let second = Command::new(bin("kakehashid"))
        .arg("--config")
        .arg(&relay.config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    assert_eq!(
        second.status.code(),
        Some(73),
        "a second daemon on the same spool exits 73"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        relay.status().destinations[0].queued == 0,
        "the first daemon is unaffected"
    );

    let status = relay.terminate();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    assert!(!relay.socket.exists(), "control socket removed on stop");
    assert!(relay.log_text().contains("stopped"));
}

#[test]
fn every_destination_gets_every_instance() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = testdata::study(
        data.path(),
        "two",
        "CR",
        testdata::CR_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        10,
        16 * 1024,
    )
    .expect("data");
    let (a, b) = (StoreScp::start(free_port()), StoreScp::start(free_port()));
    let mut opts = RelayOptions::to(a.port);
    opts.destinations
        .push(("second-opinion".into(), "READCENTER".into(), b.port));
    let relay = Relay::start(opts);
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 10);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(a.files().len(), 10);
    assert_eq!(b.files().len(), 10);
    let s = relay.status();
    assert_eq!(s.destinations.len(), 2);
    assert!(
        s.destinations.iter().all(|d| d.delivered_since_start == 10),
        "{s:?}"
    );
    wait_until(
        "payloads freed once both have them",
        Duration::from_secs(10),
        || relay.status().spool.payload_bytes == 0,
    );
}

#[test]
fn a_readable_tunnel_key_is_refused_with_exit_78() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("wg.key");
    std::fs::write(&key, "qD8pDfAfyqzRbrxCrFPB3ZSYQYBKZ2e9KjhvEV9Z7nU=\n").expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = std::fs::read_to_string(workspace_root().join("examples/minimal.toml"))
        .expect("example")
        .replace("127.0.0.1:11113", "10.8.0.1:104")
        .replace(
            "/var/lib/kakehashi/spool",
            &dir.path().join("spool").display().to_string(),
        )
        + &format!(
            "\n[tunnel]\nprivate_key_file = \"{}\"\naddress = [\"10.8.0.2/24\"]\n\n[tunnel.peer]\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nendpoint = \"center.test:51820\"\nallowed_ips = [\"10.8.0.0/24\"]\n",
            key.display()
        );
    let path = dir.path().join("kakehashi.toml");
    std::fs::write(&path, config).expect("config");
    let check = |args: &[&str]| {
        Command::new(bin("kakehashid"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .env_remove("JOURNAL_STREAM")
            .output()
            .expect("run kakehashid")
    };
    for args in [&["--check-config"][..], &[][..]] {
        let out = check(args);
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(78), "{args:?}: {text}");
        assert!(
            text.contains("tunnel.private_key_file") && text.contains("chmod 600"),
            "{args:?}: {text}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = check(&["--check-config"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("box public key iD+KqZAoixFdxntz4ySeDqtVRVjmq+FTlkR486sEuXA="),
        "{text}"
    );
}

#[test]
fn sigterm_in_the_middle_of_a_transfer_loses_nothing_and_leaves_nothing_half_written() {
    // The hospital is sending and the forwarder is delivering when systemd
    // stops the box. Everything acknowledged must be delivered after the
    // restart; no payload without its record may be left in the spool, and
    // the restart must not need recovery.
    let data = tempfile::tempdir().expect("tempdir");
    let files = testdata::study(
        data.path(),
        "term",
        "CT",
        testdata::CT_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        400,
        256 * 1024,
    )
    .expect("data");
    let center = StoreScp::start(free_port());
    let mut relay = Relay::start(RelayOptions::to(center.port));
    let port = relay.port;
    let sender = {
        let files = files.clone();
        std::thread::spawn(move || storescu(port, "MODALITY1", &files))
    };
    wait_until(
        "the transfer to be under way",
        Duration::from_secs(60),
        || center.files().len() >= 20,
    );
    let status = relay.terminate();
    assert!(
        status.success(),
        "SIGTERM mid-transfer is a clean stop: {status:?}"
    );
    let out = sender.join().expect("sender");
    assert!(
        !out.acked.is_empty() && out.acked.len() < files.len(),
        "the stop came mid-transfer ({} acknowledged)",
        out.acked.len()
    );
    // Nothing half-written: no payload file without its record (these
    // instances are in segments: no file at all), and what the spool holds
    // was acknowledged.
    let spool = relay.spool_dir();
    let held = kakehashi_spool::inspect(&spool)
        .expect("inspect the spool")
        .expect("a spool")
        .instances;
    let payloads = std::fs::read_dir(spool.join("data"))
        .expect("data dir")
        .count() as u64;
    assert_eq!(payloads, 0, "payload files were left behind");
    assert!(
        held <= out.acked.len() as u64,
        "{held} held, {} acknowledged",
        out.acked.len()
    );

    relay.restart();
    relay.wait_drained(Duration::from_secs(120));
    let log = relay.log_text();
    assert!(
        !log.contains("recovered after an unclean stop"),
        "a clean stop needs no recovery:\n{log}"
    );
    let arrived: std::collections::HashSet<String> = center
        .files()
        .iter()
        .filter_map(|p| sop_instance_of_file(&read(p)))
        .collect();
    for f in &out.acked {
        let uid = sop_instance_of_file(&read(f)).expect("uid");
        assert!(
            arrived.contains(&uid),
            "acknowledged {} never arrived",
            f.display()
        );
    }
}

/// A study goes over `destinations.associations` associations at once to
/// a center that serves several (storescp --fork, each C-STORE taking
/// seconds); a center that serves fewer (pynetdicom with
/// `maximum_associations = 2`, rejecting more with A-ASSOCIATE-RJ
/// transient, local limit exceeded) gets what it accepts, without being
/// called down, and everything arrives either way.
#[test]
fn a_study_is_spread_over_parallel_associations_and_a_center_that_takes_fewer_gets_it_too() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = testdata::study(
        data.path(),
        "parallel",
        "CR",
        testdata::CR_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        12,
        16 * 1024,
    )
    .expect("data");

    let center = StoreScp::start_forking(free_port(), 1);
    let relay = Relay::start(RelayOptions::to(center.port));
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 12);
    let mut most = (0, 0);
    wait_until(
        "8 associations (the default) with an instance each",
        Duration::from_secs(30),
        || {
            let s = relay.status();
            let d = &s.destinations[0];
            most = most.max((d.associations, d.in_flight));
            most == (8, 8) || d.queued == 0
        },
    );
    assert_eq!(most, (8, 8), "associations open, instances on the wire");
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), 12);
    drop(relay);

    // The center is down while a study arrives, so all of it waits, then
    // eight associations are asked for at once.
    let port = free_port();
    let relay = Relay::start(RelayOptions::to(port));
    let more = testdata::study(
        data.path(),
        "fewer",
        "CR",
        testdata::CR_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        40,
        16 * 1024,
    )
    .expect("data");
    assert_eq!(storescu(relay.port, "MODALITY1", &more).acked.len(), 40);
    let two = pynetdicom::Scp::start(port, &["--max-associations", "2"]);
    let down = relay.log_text().len();
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(two.stats()["stored"], 40);
    let log = relay.log_text().split_off(down);
    assert!(
        log.contains("refused one more association") && log.contains("transient"),
        "{log}"
    );
    assert!(
        !log.contains("destination unreachable"),
        "a refused association is not a center down: {log}"
    );
    let s = relay.status();
    let d = &s.destinations[0];
    assert_eq!((d.dead_letter, d.connect_failures), (0, 0), "{d:?}");
    assert!(
        (1..=2).contains(&d.associations_allowed) && d.associations_max == 8,
        "it settled on what the center serves: {d:?}"
    );
}

/// A center that serves one association at a time (storescp without
/// `--fork`, common in the field) answers the box's other workers' requests
/// only after the first association has carried the whole study. Those
/// latecomers have nothing left to send: they must let go at once, not hold
/// the center for a linger each, so another caller (`kakehashi selftest`'s
/// C-ECHO, a modality of the center) is served after one linger.
#[test]
fn associations_that_find_nothing_left_do_not_hold_a_one_at_a_time_center() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = testdata::study(
        data.path(),
        "one-at-a-time",
        "CR",
        testdata::CR_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        30,
        16 * 1024,
    )
    .expect("data");
    let center = StoreScp::start(free_port());
    let mut opts = RelayOptions::to(center.port);
    opts.associations = Some(8);
    opts.linger = "8s".into();
    opts.response_timeout = "120s".into();
    let relay = Relay::start(opts);
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 30);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), 30);
    // The first association lingers 8 s; with seven more held 8 s each in
    // turn the echo would wait about a minute.
    let echo = Command::new("echoscu")
        .args([
            "-to",
            "30",
            "-ta",
            "30",
            "-aet",
            "OTHERCALLER",
            "-aec",
            "READCENTER",
        ])
        .args(["127.0.0.1", &center.port.to_string()])
        .env("TCP_NODELAY", "1")
        .output()
        .expect("run echoscu");
    assert!(
        echo.status.success(),
        "the center was still held by the box's idle associations: {}{}",
        String::from_utf8_lossy(&echo.stdout),
        String::from_utf8_lossy(&echo.stderr)
    );
}

/// An instance that comes while an association lingers after the last
/// one goes over it: the worker holding it is woken, not one without an
/// association (which would open another: to a center serving one at a
/// time, the instance would wait until the linger ends; measured 1 s per
/// instance with the bench's linger). Three instances, each sent once the
/// one before was delivered, to a center that takes many associations:
/// one association carries all three.
#[test]
fn an_instance_that_comes_while_an_association_lingers_goes_over_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let center = StoreScp::start_with(
        free_port(),
        &std::env::temp_dir(),
        None,
        "READCENTER",
        &["--fork"],
    );
    let mut opts = RelayOptions::to(center.port);
    opts.linger = "60s".into();
    let relay = Relay::start(opts);
    for i in 1..=3 {
        let file = testdata::ct_study(data.path(), &format!("trickle{i}"), 1, 64 * 1024);
        assert_eq!(storescu(relay.port, "MODALITY1", &file).acked.len(), 1);
        wait_until(
            "the instance at the center",
            Duration::from_secs(30),
            || center.files().len() == i,
        );
    }
    assert_eq!(
        center.associations(),
        1,
        "associations the center accepted for three instances, each sent while the first lingered"
    );
}

/// `kakehashi studies --json`, as an operator's script reads it.
fn studies_json(relay: &Relay) -> Vec<kakehashi_control::StudyInfo> {
    let out = relay.cli(&["studies", "--json"]);
    assert!(out.status.success(), "{out:?}");
    match serde_json::from_slice(&out.stdout).expect("studies --json") {
        kakehashi_control::Response::Studies { entries } => entries,
        other => panic!("studies: {other:?}"),
    }
}

#[test]
fn a_study_shows_its_progress_while_it_flows_and_complete_once_it_has_arrived() {
    // A center that sleeps a second per PDU it reads (storescp
    // --sleep-during), four associations at a time: 24 instances of
    // 16 KiB take ~12 s, long enough to watch.
    let data = tempfile::tempdir().expect("tempdir");
    let files = testdata::study(
        data.path(),
        "progress",
        "CR",
        testdata::CR_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        24,
        16 * 1024,
    )
    .expect("data");
    let uid = testdata::study_uid_of_file(&read(&files[0]));
    let center = StoreScp::start_forking(free_port(), 1);
    let mut opts = RelayOptions::to(center.port);
    opts.associations = Some(4);
    let relay = Relay::start(opts);
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 24);

    // In status, under the destination: what is left, on the wire, the
    // rate and the time left, once two acknowledgements give a rate.
    let mut seen = None;
    wait_until(
        "a rate and an ETA in status",
        Duration::from_secs(30),
        || {
            let s = relay.status();
            seen = s.destinations[0]
                .studies
                .iter()
                .find(|p| p.study_instance_uid == uid && p.eta_s.is_some())
                .cloned();
            seen.is_some() || s.destinations[0].queued == 0
        },
    );
    let p = seen.expect("the study's progress with a rate, before it was all sent");
    assert_eq!(p.received, 24, "{p:?}");
    assert!(p.queued >= 1 && p.queued < 24, "{p:?}");
    assert!(p.on_the_wire >= 1 && p.on_the_wire <= 4, "{p:?}");
    assert!(p.delivered >= 2 && p.delivered + p.queued == 24, "{p:?}");
    let rate = p.rate_bytes_per_s.expect("rate");
    // 4 × 16 KiB a second at most; a unit slip (ms for s) is 1000× off.
    assert!((2 * 1024..=256 * 1024).contains(&rate), "{p:?}");
    assert_eq!(p.eta_s, Some(p.queued_bytes.div_ceil(rate)), "{p:?}");
    let text = String::from_utf8_lossy(&relay.cli(&["status"]).stdout).to_string();
    assert!(text.contains(&format!("study {uid}: ")), "{text}");

    let during = studies_json(&relay);
    let e = during
        .iter()
        .find(|e| e.study_instance_uid == uid)
        .expect("listed");
    assert!(!e.complete && e.pending > 0, "{e:?}");
    assert_eq!(e.acknowledged + e.pending, 24, "{e:?}");
    assert_eq!(e.acknowledged_bytes + e.pending_bytes, e.bytes, "{e:?}");

    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), 24);
    let after = studies_json(&relay);
    let e = after
        .iter()
        .find(|e| e.study_instance_uid == uid)
        .expect("listed");
    assert!(e.complete, "{e:?}");
    assert_eq!(
        (
            e.acknowledged,
            e.pending,
            e.pending_bytes,
            e.on_the_wire,
            e.eta_s
        ),
        (24, 0, 0, 0, None),
        "{e:?}"
    );
    assert_eq!(e.acknowledged_bytes, e.bytes);
    assert!(relay.status().destinations[0].studies.is_empty());
    let text = String::from_utf8_lossy(&relay.cli(&["studies"]).stdout).to_string();
    assert!(text.contains("complete at the destinations"), "{text}");
}
