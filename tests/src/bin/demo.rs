//! `make demo`: a field engineer's visit and then the whole path —
//! hospital → box → WireGuard tunnel → reading center — in network
//! namespaces, with real peers.
//!
//! Three namespaces stand for the hospital (DCMTK storescu; a storescp as
//! its PACS answering C-ECHO), the box (kakehashid with its in-process
//! boringtun tunnel, and swtpm as its TPM) and the reading center
//! (wireguard-go + `wg` as the hub, DCMTK storescp on its tunnel address).
//! `kakehashi provision` makes the identity and sealed keys in the TPM and
//! writes the config; the center enrolls the printed WireGuard key. The
//! center's WireGuard starts down: the box acknowledges everything, holds it
//! sealed (destination paused), and delivers it once the center is up.
//! Then `kakehashi selftest`, what arrived (byte-identical?) and the audit
//! trail. Namespaces, processes and temp files are removed on exit.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use kakehashi_systest::netns::*;
use kakehashi_systest::testdata::{dataset_of_file, varied_set};
use kakehashi_systest::visit::*;
use kakehashi_systest::*;

fn section(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn show(out: std::process::Output) {
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

fn main() {
    let data = tempfile::Builder::new()
        .prefix("kakehashi-demo-")
        .tempdir()
        .expect("temp dir");
    section("1. The hospital's studies (generated)");
    let files = varied_set(&data.path().join("hospital")).expect("generate studies");
    let mut by_ts: HashMap<String, usize> = HashMap::new();
    for f in &files {
        *by_ts
            .entry(transfer_syntax_of_file(&read(f)).unwrap_or_default())
            .or_default() += 1;
    }
    println!(
        "{} instances in {} transfer syntaxes",
        files.len(),
        by_ts.len()
    );

    section("2. Three network namespaces: hospital, box (with swtpm as its TPM), reading center");
    let mut v = Visit::new();
    println!(
        "hospital {} ({HOSPITAL_IP}) --LAN-- box {} ({BOX_LAN_IP} | {BOX_WAN_IP}) --WAN-- center {} ({CENTER_WAN_IP} = {CENTER_NAME})",
        v.site.hospital.name(),
        v.site.boxns.name(),
        v.site.center.name()
    );
    println!("tunnel: box {BOX_TUNNEL_IP} (boringtun in kakehashid) <=> center {CENTER_TUNNEL_IP} (wireguard-go)");
    let _pacs = StoreScp::start_as(
        PACS_PORT,
        data.path(),
        Some(v.site.hospital.name()),
        PACS_AE,
    );
    let center = StoreScp::start_ns(CENTER_DICOM_PORT, data.path(), Some(v.site.center.name()));
    println!("hospital PACS: {PACS_AE} at {HOSPITAL_IP}:{PACS_PORT}; reading center: READCENTER at {CENTER_TUNNEL_IP}:{CENTER_DICOM_PORT}");
    println!("the box's TPM: swtpm at {}", v.swtpm.tcti());

    section("3. The field engineer: kakehashi provision --site site.toml");
    print!(
        "{}",
        std::fs::read_to_string(&v.site_file).unwrap_or_default()
    );
    println!("\n$ kakehashi provision --site site.toml --config kakehashi.toml");
    let provisioned = v.provision(&[]);
    let out = text(&provisioned);
    print!("{out}");
    if !provisioned.status.success() {
        eprintln!("provisioning failed; stopping the demo");
        std::process::exit(1);
    }
    let wg = wireguard_key_of(&out);

    section("4. The reading center enrolls the box's key; its WireGuard is DOWN for now");
    v.site.set_box_public(&wg);
    v.site.stop_center_wireguard();
    println!(
        "center: wg set {} peer {wg} allowed-ips {BOX_TUNNEL_IP}/32, then stopped",
        v.site.center_interface
    );

    section("5. Start kakehashid in the box namespace");
    let relay = v.start();
    show(
        Command::new(bin("kakehashid"))
            .arg("--check-config")
            .arg("--config")
            .arg(&v.config)
            .output()
            .expect("kakehashid"),
    );

    section("6. The hospital sends (DCMTK storescu in the hospital namespace)");
    let sent = v.send(&files);
    println!(
        "storescu: {} acknowledged by the box, {} refused",
        sent.acked.len(),
        sent.failed.len()
    );
    let direct = echoscu_at(
        Some(v.site.hospital.name()),
        CENTER_TUNNEL_IP,
        CENTER_DICOM_PORT,
        PACS_AE,
        "READCENTER",
    );
    println!(
        "echoscu from the hospital straight to the center: {}",
        if direct.status.success() {
            "reached it (unexpected!)"
        } else {
            "no route, as it must be: the only way across is the box"
        }
    );
    std::thread::sleep(Duration::from_secs(11));
    println!("\n$ kakehashi status");
    show(relay.cli(&["status"]));

    section("7. The center's WireGuard comes up");
    v.site.start_center_wireguard();
    relay.wait_drained(Duration::from_secs(180));
    println!("$ kakehashi status");
    show(relay.cli(&["status"]));
    println!("\n$ wg show   (on the box: kakehashid serves the UAPI socket)");
    print!("{}", v.site.wg_show(true));
    println!("\n$ wg show   (on the center: wireguard-go)");
    print!("{}", v.site.wg_show(false));

    section("8. kakehashi selftest");
    print!("{}", text(&v.selftest()));

    section("9. What arrived at the reading center");
    let originals: HashMap<String, Vec<u8>> = files
        .iter()
        .map(|f| {
            let b = read(f);
            (
                sop_instance_of_file(&b).unwrap_or_default(),
                dataset_of_file(&b).unwrap_or_default().to_vec(),
            )
        })
        .collect();
    let mut identical = 0;
    let arrived = center.files();
    for f in &arrived {
        let b = read(f);
        let uid = sop_instance_of_file(&b).unwrap_or_default();
        if originals.get(&uid).map(Vec::as_slice) == dataset_of_file(&b) {
            identical += 1;
        }
    }
    for f in arrived.iter().step_by(3) {
        // DCMTK converts ISO_IR 192 to UTF-8 for display but not ISO 2022 IR 87
        // (its iconv backend lacks it): those names show raw, ESC as ␛.
        let dump = |utf8: bool| {
            let mut c = Command::new("dcmdump");
            c.arg("-q");
            if utf8 {
                c.arg("+U8");
            }
            c.args([
                "+P",
                "Modality",
                "+P",
                "PatientName",
                "+P",
                "TransferSyntaxUID",
                "+P",
                "SpecificCharacterSet",
            ])
            .arg(f);
            c.output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| o.stdout)
        };
        let Some(out) = dump(true).or_else(|| dump(false)) else {
            continue;
        };
        let text = String::from_utf8_lossy(&out).replace('\x1b', "␛");
        let fields: Vec<String> = text
            .lines()
            .map(|l| {
                let v = l.split_once(' ').map_or(l, |x| x.1).trim_start();
                let v = v.split_once('#').map_or(v, |x| x.0).trim();
                v.split_once(' ').map_or(v, |x| x.1).trim().to_string()
            })
            .collect();
        println!("  {}", fields.join("  "));
    }
    println!(
        "{} of {} instances arrived; {} byte-identical to the hospital's files (deflated ones are re-deflated by storescu itself)",
        arrived.len(),
        files.len(),
        identical
    );

    section("10. Audit trail (last 8 records)");
    let audit = relay.cli(&["audit", "--limit", "1000"]);
    let text = String::from_utf8_lossy(&audit.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    for l in &lines[lines.len().saturating_sub(8)..] {
        println!("{l}");
    }
    println!(
        "\nDone. The namespaces, every process and temporary file of the demo are removed on exit."
    );
    drop(relay);
    drop(center);
    drop(v);
}
