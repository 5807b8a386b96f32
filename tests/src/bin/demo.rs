//! `make demo`: a field engineer's visit and then the whole path —
//! hospital → box → WireGuard tunnel → reading center — in network
//! namespaces, with real peers.
//!
//! Three namespaces stand for the hospital (DCMTK storescu; Orthanc as its
//! PACS; aiosmtpd as its mail relay), the box (kakehashid with its
//! in-process boringtun tunnel, and swtpm as its TPM) and the reading center
//! (wireguard-go + `wg` as the hub, DCMTK storescp on its tunnel address).
//! `kakehashi provision` makes the identity and sealed keys in the TPM and
//! writes the config; the center enrolls the printed WireGuard key. The
//! center's WireGuard starts down: the box acknowledges everything, holds it
//! sealed (destination paused), and delivers it once the center is up.
//! Then `kakehashi selftest` and what arrived (byte-identical?). The
//! round trip closes: the center's radiologist sends back an SR (signed
//! with DCMTK's dcmsign) that codes a pneumothorax; it reaches the
//! hospital's Orthanc byte-identical, the referring department gets an
//! e-mail, and `kakehashi urgent ack` records who took it. Last, the audit
//! trail. Namespaces, processes and temp files are removed on exit.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use kakehashi_systest::netns::*;
use kakehashi_systest::testdata::{dataset_of_file, run_ok, sr_report, varied_set};
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
    let mut v = Visit::with_round_trip();
    println!(
        "hospital {} ({HOSPITAL_IP}) --LAN-- box {} ({BOX_LAN_IP} | {BOX_WAN_IP}) --WAN-- center {} ({CENTER_WAN_IP} = {CENTER_NAME})",
        v.site.hospital.name(),
        v.site.boxns.name(),
        v.site.center.name()
    );
    println!("tunnel: box {BOX_TUNNEL_IP} (boringtun in kakehashid) <=> center {CENTER_TUNNEL_IP} (wireguard-go)");
    let pacs = Orthanc::start_on(
        Some(v.site.hospital.name()),
        PACS_AE,
        PACS_PORT,
        serde_json::json!({}),
    );
    let smtp = Smtp::start_at(
        Some(v.site.hospital.name()),
        HOSPITAL_IP,
        SMTP_PORT,
        &data.path().join("maildir"),
    );
    let center = StoreScp::start_ns(CENTER_DICOM_PORT, data.path(), Some(v.site.center.name()));
    println!("hospital PACS: Orthanc, {PACS_AE} at {HOSPITAL_IP}:{PACS_PORT}; mail relay: aiosmtpd at {HOSPITAL_IP}:{SMTP_PORT}");
    println!("reading center: READCENTER at {CENTER_TUNNEL_IP}:{CENTER_DICOM_PORT}; it sends reports to the box at {BOX_TUNNEL_IP}:{RESULTS_PORT}");
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

    section("10. The radiologist reports: an SR, signed with dcmsign, coding a pneumothorax");
    let first = read(&files[0]);
    let keys = kakehashi_dicom::scan::routing_keys(
        &transfer_syntax_of_file(&first).unwrap_or_default(),
        dataset_of_file(&first).unwrap_or_default(),
    );
    let study_uid = keys.study_instance_uid.unwrap_or_default();
    let reports = data.path().join("center");
    std::fs::create_dir_all(&reports).expect("dir");
    let sr = sr_report(
        &reports,
        "report",
        &study_uid,
        &keys.patient_id.unwrap_or_default(),
        "Right-sided tension pneumothorax. Immediate decompression advised.",
        Some("Sato^Hanako"),
        Some(("SCT", "36118008", "Pneumothorax")),
    );
    let (key, cert) = (reports.join("signer.key"), reports.join("signer.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
            ])
            .args(["-subj", "/CN=Dr Hanako Sato/O=Reading Center"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    // The signature must come after the certificate's first second.
    std::thread::sleep(Duration::from_millis(1100));
    let signed = reports.join("report-signed.dcm");
    run_ok(
        Command::new("dcmsign")
            .arg("--sign")
            .arg(&key)
            .arg(&cert)
            .arg("+m2")
            .arg(&sr)
            .arg(&signed),
    );
    println!("report for study {study_uid}: \"Right-sided tension pneumothorax\" (SCT 36118008), signed by CN=Dr Hanako Sato");
    let back = storescu_at(
        Some(v.site.center.name()),
        BOX_TUNNEL_IP,
        RESULTS_PORT,
        "READCENTER",
        "KAKEHASHI",
        std::slice::from_ref(&signed),
    );
    println!(
        "storescu, center -> box {BOX_TUNNEL_IP}:{RESULTS_PORT} (through the tunnel): {} acknowledged",
        back.acked.len()
    );

    section("11. The report in the hospital's PACS (Orthanc)");
    wait_until("the report in Orthanc", Duration::from_secs(60), || {
        !pacs.instance_ids().is_empty()
    });
    let id = pacs.instance_ids().into_iter().next().unwrap_or_default();
    let stored = pacs.instance_file(&id);
    let original = read(&signed);
    println!(
        "Orthanc holds it: study {study_uid}, byte-identical to what the center sent: {}",
        if dataset_of_file(&stored) == dataset_of_file(&original) {
            "yes"
        } else {
            "NO"
        }
    );
    let in_pacs = reports.join("from-orthanc.dcm");
    std::fs::write(&in_pacs, &stored).expect("write");
    let verified = Command::new("dcmsign")
        .arg("--verify")
        .arg(&in_pacs)
        .output()
        .expect("dcmsign");
    let said = String::from_utf8_lossy(&verified.stderr).to_string()
        + &String::from_utf8_lossy(&verified.stdout);
    println!(
        "dcmsign --verify on Orthanc's copy: {}",
        if said.contains("signature is OK") {
            "the signature is OK (the certificate is the center's own, self-signed)"
        } else {
            "FAILED"
        }
    );
    println!("\n$ kakehashi status");
    show(relay.cli(&["status"]));

    section("12. The urgent finding: e-mail to the referring department, then acknowledged");
    wait_until("the urgent e-mail", Duration::from_secs(60), || {
        !smtp.messages().is_empty()
    });
    let mail = smtp.messages().into_iter().next().unwrap_or_default();
    let (head, body) = mail.split_once("\n\n").unwrap_or((&mail, ""));
    for l in head.lines().filter(|l| {
        ["From:", "To:", "Subject:"]
            .iter()
            .any(|h| l.starts_with(h))
    }) {
        println!("  {l}");
    }
    println!();
    for l in body.lines().take(16) {
        println!("  {l}");
    }
    println!("\n$ kakehashi urgent");
    show(relay.cli(&["urgent"]));
    let first_urgent = match relay.request(&kakehashi_control::Request::Urgent) {
        kakehashi_control::Response::Urgent { entries } => entries.first().map(|e| e.id),
        _ => None,
    };
    if let Some(u) = first_urgent {
        let u = u.to_string();
        println!("\n$ kakehashi urgent ack {u} --by \"Dr Tanaka, emergency department\"");
        show(relay.cli(&[
            "urgent",
            "ack",
            &u,
            "--by",
            "Dr Tanaka, emergency department",
        ]));
        println!("\n$ kakehashi urgent");
        show(relay.cli(&["urgent"]));
    }

    section("13. Audit trail (last 12 records)");
    let audit = relay.cli(&["audit", "--limit", "1000"]);
    let text = String::from_utf8_lossy(&audit.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    for l in &lines[lines.len().saturating_sub(12)..] {
        println!("{l}");
    }
    println!(
        "\nDone. The namespaces, every process and temporary file of the demo are removed on exit."
    );
    drop(relay);
    drop(center);
    drop(pacs);
    drop(smtp);
    drop(v);
}
