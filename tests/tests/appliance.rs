//! The appliance image (`make image`) booted in qemu as a real box would
//! be: OVMF with Secure Boot, swtpm as its TPM, its LAN and WAN ports on
//! the namespaces of [`Site`] (hospital, and a center running wireguard-go
//! and storescp), provisioned from a USB stick, and its power cut by
//! SIGKILLing qemu: whatever the guest had not flushed to its disk is lost,
//! which `kill -9` of a process never shows.
//!
//! qemu runs under TCG here: a boot takes 25–60 s. The image is built once
//! per test run (`make test` builds it; `KAKEHASHI_IMAGE_DIR` points at it).

use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kakehashi_systest::netns::*;
use kakehashi_systest::testdata;
use kakehashi_systest::vm::{
    by_uid, center_scp, site_toml, uid_of, wait_delivered, BoxVm, Image, BOOT, CENTER_DICOM_PORT,
    DICOM_PORT, DONE, READY, STORESCU_TIMEOUTS,
};
use kakehashi_systest::*;

/// nmap's verdict per port ("open", "filtered", "closed", …) on `target`,
/// scanned from namespace `ns`.
fn scan(ns: &str, target: &str, args: &[&str]) -> Vec<(String, String)> {
    let out = ns_command(Some(ns), "nmap")
        .args(["-Pn", "-n", "-oG", "-", "--max-retries", "1"])
        .args(args)
        .arg(target)
        .output()
        .expect("nmap (apt-get install nmap)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "nmap failed: {text}");
    // Grepable output: "Ports: 104/open/tcp//acr-nema///, …" and
    // "Ignored State: filtered (65534)".
    let mut ports = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Ports: ").nth(1) {
            for p in rest.split("\t").next().unwrap_or("").split(", ") {
                let f: Vec<&str> = p.split('/').collect();
                if f.len() > 2 {
                    ports.push((format!("{}/{}", f[0], f[2]), f[1].to_string()));
                }
            }
        }
        if let Some(rest) = line.split("Ignored State: ").nth(1) {
            ports.push(("(others)".into(), rest.trim().to_string()));
        }
    }
    ports
}

fn open_ports(scan: &[(String, String)]) -> Vec<String> {
    scan.iter()
        .filter(|(_, state)| state == "open")
        .map(|(p, _)| p.clone())
        .collect()
}

/// No port answered with a refusal (an RST or an ICMP port unreachable):
/// the firewall dropped, rather than the kernel refused.
fn assert_nothing_answers(scan: &[(String, String)], what: &str) {
    for (port, state) in scan {
        assert!(
            !state.starts_with("closed"),
            "{what}: port {port} answered ({state}): the firewall let it through to the kernel"
        );
    }
}

/// storescu in the hospital, its acknowledgements read as they come.
struct Sending {
    child: Proc,
    acked: Arc<Mutex<Vec<PathBuf>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Sending {
    fn start(site: &Site, files: &[PathBuf]) -> Sending {
        let mut child = ns_command(Some(site.hospital.name()), "storescu")
            .args(["-v", "-nh", "-R", "-xe"])
            .args(STORESCU_TIMEOUTS)
            .args(["-aet", "MODALITY1", "-aec", "KAKEHASHI", BOX_LAN_IP])
            .arg(DICOM_PORT.to_string())
            .args(files)
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("storescu");
        let acked: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
        let current: Arc<Mutex<Option<PathBuf>>> = Arc::default();
        let mut readers = Vec::new();
        let outs: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for out in outs {
            let (acked, current) = (Arc::clone(&acked), Arc::clone(&current));
            readers.push(std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Some(f) = line.strip_prefix("I: Sending file: ") {
                        *current.lock().expect("lock") = Some(PathBuf::from(f.trim()));
                    } else if line.starts_with("I: Received Store Response (Success)") {
                        if let Some(f) = current.lock().expect("lock").take() {
                            acked.lock().expect("lock").push(f);
                        }
                    }
                }
            }));
        }
        Sending {
            child: Proc(child),
            acked,
            readers,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    fn finished(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(Some(_)))
    }

    /// Stops storescu; every file it saw acknowledged.
    fn stop(self) -> Vec<PathBuf> {
        let Sending {
            child,
            acked,
            readers,
        } = self;
        drop(child);
        for r in readers {
            let _ = r.join();
        }
        let v = acked.lock().expect("lock").clone();
        v
    }
}

#[test]
fn the_image_boots_provisions_itself_relays_and_survives_power_cuts() {
    let image = Image::get();
    let mut site = Site::new();
    site.for_vm();
    let scp = center_scp(&site);
    let h = site.hospital.name().to_string();
    let data = tempfile::tempdir().expect("tempdir");
    let mut vm = BoxVm::new(&image, Some(&site));
    let mut ready_times = Vec::new();

    // ---- Boot 1: a new box, a new TPM, firmware in Secure Boot setup mode,
    // the field engineer's stick in its USB port.
    vm.insert_medium(Some(&site_toml(&site)));
    vm.boot();
    vm.wait_console("verified by dm-verity", BOOT);
    let console = vm.console();
    assert!(
        console.contains("Secure boot enabled"),
        "the kernel did not boot under Secure Boot:\n{console}"
    );
    vm.wait_console(DONE, BOOT);
    let serials = vm.medium_serials();
    assert_eq!(
        serials.len(),
        1,
        "one result directory per box: {serials:?}"
    );
    let serial = serials[0].clone();
    let file = |vm: &BoxVm, name: &str| {
        vm.medium_file(&format!("kakehashi/{serial}/{name}"))
            .unwrap_or_else(|| panic!("kakehashi/{serial}/{name} is not on the medium"))
    };
    assert!(vm
        .medium_file(&format!("kakehashi/{serial}/done"))
        .is_some());
    let wg_public = file(&vm, "wireguard.pub").trim().to_string();
    for name in ["identity.pub.pem", "identity.csr.pem", "for-the-center.txt"] {
        assert!(!file(&vm, name).is_empty(), "{name} is empty");
    }
    assert!(file(&vm, "identity.csr.pem").contains("BEGIN CERTIFICATE REQUEST"));
    let selftest = file(&vm, "selftest.txt");
    println!("self-test on the box:\n{selftest}");
    for check in ["root filesystem", "dm-verity"] {
        assert!(
            selftest
                .lines()
                .any(|l| l.starts_with("[PASS]") && l.contains(check)),
            "the self-test has no passing {check:?} check:\n{selftest}"
        );
    }
    let console = vm.console();
    assert!(
        console.contains(&wg_public),
        "the console summary does not show the box's WireGuard key"
    );

    // The center's operator adds the box's key; the tunnel comes up and a
    // study crosses it byte-identical.
    site.set_box_public(&wg_public);
    let first = testdata::ct_study(&data.path().join("first"), "first", 12, 200 * 1024);
    let out = storescu_with(
        Some(&h),
        BOX_LAN_IP,
        DICOM_PORT,
        "MODALITY1",
        "KAKEHASHI",
        &first,
        STORESCU_TIMEOUTS,
    );
    assert_eq!(out.acked.len(), first.len(), "storescu: {}", out.output);
    wait_delivered(&scp, &first, Duration::from_secs(120));

    // ---- The firewall, seen from outside: both sides at once, every TCP
    // port, then UDP. A dropped UDP port and an open one look alike to a
    // scanner, but a port the firewall let through and nobody listens on
    // answers ICMP unreachable ("closed"). WireGuard's port is open: the
    // tunnel works.
    let c = site.center.name().to_string();
    let tcp = ["-sS", "-p-", "--min-rate", "2000"];
    let udp = ["-sU", "-p", "1-1024,5353,51819-51821", "--min-rate", "2000"];
    let (lan_tcp, wan_tcp, lan_udp, wan_udp) = std::thread::scope(|s| {
        let lan = s.spawn(|| scan(&h, BOX_LAN_IP, &tcp));
        let wan = s.spawn(|| scan(&c, BOX_WAN_IP, &tcp));
        let (lan, wan) = (lan.join().expect("scan"), wan.join().expect("scan"));
        let lan_udp = s.spawn(|| scan(&h, BOX_LAN_IP, &udp));
        let wan_udp = s.spawn(|| scan(&c, BOX_WAN_IP, &udp));
        (
            lan,
            wan,
            lan_udp.join().expect("scan"),
            wan_udp.join().expect("scan"),
        )
    });
    assert_eq!(
        open_ports(&lan_tcp),
        vec![format!("{DICOM_PORT}/tcp")],
        "LAN TCP scan: {lan_tcp:?}"
    );
    assert_nothing_answers(&lan_tcp, "LAN TCP");
    assert!(open_ports(&wan_tcp).is_empty(), "WAN TCP scan: {wan_tcp:?}");
    assert_nothing_answers(&wan_tcp, "WAN TCP");
    assert_nothing_answers(&lan_udp, "LAN UDP");
    assert_nothing_answers(&wan_udp, "WAN UDP");
    // The DICOM port only for the configured sources' addresses: another
    // machine on the hospital's LAN gets nothing.
    run(Command::new("ip").args(["-n", &h, "addr", "add", "192.0.2.99/24", "dev", "lan0"]));
    let other = scan(
        &h,
        BOX_LAN_IP,
        &[
            "-sS",
            "-S",
            "192.0.2.99",
            "-e",
            "lan0",
            "-p",
            &DICOM_PORT.to_string(),
        ],
    );
    assert!(
        open_ports(&other).is_empty(),
        "the DICOM port is open to an unconfigured address: {other:?}"
    );
    // The LAN reaches neither the center's tunnel address nor its WAN
    // address through the box (its default route points at the box).
    for target in [CENTER_TUNNEL_IP, CENTER_WAN_IP] {
        let out = echoscu_at(
            Some(&h),
            target,
            CENTER_DICOM_PORT,
            "MODALITY1",
            "READCENTER",
        );
        assert!(!out.status.success(), "the hospital reached {target}");
        let ping = ns_command(Some(&h), "ping")
            .args(["-c", "2", "-W", "1", target])
            .output()
            .expect("ping");
        assert!(!ping.status.success(), "ping from the LAN reached {target}");
    }
    println!(
        "firewall: LAN open {:?}; WAN TCP open {:?}",
        open_ports(&lan_tcp),
        open_ports(&wan_tcp)
    );

    // ---- Boot 2, an orderly restart with the stick still in: provisioning
    // again changes nothing, and the sealed keys unseal on the box's own TPM.
    vm.shutdown(Duration::from_secs(60));
    vm.boot();
    ready_times.push(vm.wait_console(READY, BOOT));
    vm.wait_console(DONE, BOOT);
    assert_eq!(
        vm.medium_serials(),
        vec![serial.clone()],
        "the same box, the same serial"
    );
    assert_eq!(
        file(&vm, "wireguard.pub").trim(),
        wg_public,
        "provisioning again changed the WireGuard key"
    );
    vm.eject_medium();

    // ---- Power cuts while a study flows in over a slow WAN (so what the
    // box acknowledged is still in its spool when the power goes), over
    // three associations at once: their frames share flushes (group
    // commit) where a segment is used again, as the first study's is.
    site.limit_rate("4mbit");
    let study = testdata::ct_study(&data.path().join("big"), "powercut", 420, 64 * 1024);
    let mut acked: Vec<PathBuf> = Vec::new();
    let mut at_risk_total = 0;
    let cuts = 5;
    for cut in 1..=cuts {
        let done: HashSet<&PathBuf> = acked.iter().collect();
        let remaining: Vec<PathBuf> = study
            .iter()
            .filter(|f| !done.contains(f))
            .cloned()
            .collect();
        let mut sending: Vec<Sending> = remaining
            .chunks(remaining.len().div_ceil(3).max(1))
            .map(|part| Sending::start(&site, part))
            .collect();
        let after = 20 + fastrand::usize(..60);
        wait_until(
            "acknowledgements before the cut",
            Duration::from_secs(180),
            || {
                sending.iter().map(Sending::acked).sum::<usize>() >= after.min(remaining.len())
                    || sending.iter_mut().all(Sending::finished)
            },
        );
        std::thread::sleep(Duration::from_millis(fastrand::u64(..300)));
        vm.power_cut();
        std::thread::sleep(Duration::from_secs(1));
        let now_acked: Vec<PathBuf> = sending.into_iter().flat_map(Sending::stop).collect();
        let at_center = by_uid(&scp);
        let at_risk = now_acked
            .iter()
            .filter(|f| !at_center.contains_key(&uid_of(f)))
            .count();
        at_risk_total += at_risk;
        println!(
            "power cut {cut}: {} acknowledged in this run, {at_risk} of them not yet at the center",
            now_acked.len()
        );
        acked.extend(now_acked);
        vm.boot();
        ready_times.push(vm.wait_console(READY, BOOT));
    }
    assert!(
        at_risk_total > 0,
        "every cut came after the center had everything: the test proved nothing"
    );
    let acked_before_cuts = acked.len();
    // What is left, after the last boot; then everything acknowledged
    // reaches the center.
    let done: HashSet<&PathBuf> = acked.iter().collect();
    let remaining: Vec<PathBuf> = study
        .iter()
        .filter(|f| !done.contains(f))
        .cloned()
        .collect();
    let out = storescu_with(
        Some(&h),
        BOX_LAN_IP,
        DICOM_PORT,
        "MODALITY1",
        "KAKEHASHI",
        &remaining,
        STORESCU_TIMEOUTS,
    );
    assert_eq!(out.acked.len(), remaining.len(), "storescu: {}", out.output);
    site.clear_rate();
    wait_delivered(&scp, &study, Duration::from_secs(300));
    println!(
        "power cuts: {cuts}; acknowledged before a cut {acked_before_cuts} ({at_risk_total} of them still only on the box when its power went); after: {} of {} instances at the center, byte-identical ({} files received in all: instances sent again after a cut)",
        by_uid(&scp).len() - first.len(),
        study.len(),
        scp.files().len()
    );

    // ---- Another TPM (the board was swapped): the sealed keys do not load,
    // and the console says so.
    vm.shutdown(Duration::from_secs(60));
    vm.replace_tpm();
    vm.boot();
    vm.wait_console("does not load on this TPM", BOOT);
    vm.power_cut();

    let secs: Vec<String> = ready_times
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect();
    println!("power on to READY=1 (s), boots 2..: {}", secs.join(", "));
}

#[test]
fn a_byte_flipped_in_the_root_filesystem_stops_the_boot() {
    let image = Image::get();
    let mut vm = BoxVm::new(&image, None);
    vm.damage_root(&image, "a");
    vm.boot();
    let t = vm.wait_console("fails verification", BOOT);
    let console = vm.console();
    let line = console
        .lines()
        .find(|l| l.contains("fails verification"))
        .unwrap_or_default();
    println!("after {:.1} s the console says: {line}", t.as_secs_f64());
    assert!(
        !console.contains(READY),
        "kakehashid started on a root that fails verification"
    );
    vm.power_cut();
}
