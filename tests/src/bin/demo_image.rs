//! `make demo-image`: the `make demo` story on the appliance image itself —
//! a new box in qemu (OVMF with Secure Boot, swtpm as its TPM), its LAN and
//! WAN ports in the hospital's and the center's network namespaces,
//! provisioned from a USB stick without a shell, relaying the hospital's
//! studies through its WireGuard tunnel; then switched off and on again, and
//! scanned from outside.
//!
//! qemu runs under software emulation here: each boot takes a minute or so.

use std::collections::HashMap;
use std::time::Duration;

use kakehashi_systest::netns::*;
use kakehashi_systest::testdata::{dataset_of_file, varied_set};
use kakehashi_systest::vm::{site_toml, BoxVm, Image, CENTER_DICOM_PORT, DICOM_PORT, DONE, READY};
use kakehashi_systest::*;

const BOOT: Duration = Duration::from_secs(300);

fn section(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// The last block the box printed between its `=====` rulers.
fn last_summary(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let rulers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with("=".repeat(72).as_str()) && !l.contains(']'))
        .map(|(i, _)| i)
        .collect();
    match rulers.as_slice() {
        [.., a, b] => lines[a + 1..*b].join("\n"),
        _ => String::new(),
    }
}

fn main() {
    let image = Image::get();
    section("1. The image (make image)");
    println!(
        "version {}, root hash {}\nkakehashid exposure (systemd-analyze security) {}",
        image.read("version"),
        image.read("roothash"),
        image.read("exposure")
    );

    section("2. A hospital LAN and a WAN to the reading center (network namespaces)");
    let mut site = Site::new();
    site.for_vm();
    let data = tempfile::Builder::new()
        .prefix("kakehashi-demo-image-")
        .tempdir()
        .expect("temp dir");
    let center = StoreScp::start_ns(CENTER_DICOM_PORT, data.path(), Some(site.center.name()));
    println!(
        "hospital {} ({HOSPITAL_IP}) --LAN-- [box: qemu, {BOX_LAN_IP} | {BOX_WAN_IP}] --WAN-- center {} ({CENTER_WAN_IP}: wireguard-go, storescp on {CENTER_TUNNEL_IP}:{CENTER_DICOM_PORT})",
        site.hospital.name(),
        site.center.name()
    );

    section("3. The field engineer plugs in the stick (KAKEHASHI) with site.toml, and switches on");
    let toml = site_toml(&site);
    print!("{toml}");
    let mut vm = BoxVm::new(&image, Some(&site));
    vm.insert_medium(Some(&toml));
    vm.boot();
    let verified = vm.wait_console("verified by dm-verity", BOOT);
    println!(
        "\n{:>5.1} s  the initramfs: root verified by dm-verity",
        verified.as_secs_f64()
    );
    let ready = vm.wait_console(READY, BOOT);
    println!("{:>5.1} s  kakehashid READY=1", ready.as_secs_f64());
    let done = vm.wait_console(DONE, BOOT);
    println!(
        "{:>5.1} s  provisioned; the console says:\n",
        done.as_secs_f64()
    );
    println!("{}", last_summary(&vm.console()));

    section("4. What the box wrote to the stick");
    let serial = vm
        .medium_serials()
        .into_iter()
        .next()
        .expect("a result directory on the stick");
    for name in ["wireguard.pub", "for-the-center.txt", "selftest.txt"] {
        let text = vm
            .medium_file(&format!("kakehashi/{serial}/{name}"))
            .unwrap_or_default();
        println!("--- kakehashi/{serial}/{name}\n{}", text.trim_end());
    }
    vm.eject_medium();

    section("5. The reading center enrolls the box's WireGuard key");
    let wg = vm
        .medium_file(&format!("kakehashi/{serial}/wireguard.pub"))
        .unwrap_or_default()
        .trim()
        .to_string();
    site.set_box_public(&wg);
    println!(
        "center: wg set {} peer {wg} allowed-ips {BOX_TUNNEL_IP}/32",
        site.center_interface
    );

    section("6. The hospital sends (DCMTK storescu in the hospital namespace)");
    let files = varied_set(&data.path().join("hospital")).expect("generate studies");
    let h = site.hospital.name().to_string();
    let sent = storescu_with(
        Some(&h),
        BOX_LAN_IP,
        DICOM_PORT,
        "MODALITY1",
        "KAKEHASHI",
        &files,
        &[],
    );
    println!(
        "storescu: {} of {} acknowledged by the box",
        sent.acked.len(),
        files.len()
    );
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
    let identical = || {
        center
            .files()
            .iter()
            .filter(|f| {
                let b = read(f);
                sop_instance_of_file(&b)
                    .and_then(|u| originals.get(&u))
                    .map(Vec::as_slice)
                    == dataset_of_file(&b)
            })
            .count()
    };
    let _ = std::panic::catch_unwind(|| {
        wait_until("the study at the center", Duration::from_secs(180), || {
            center.files().len() >= files.len()
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "at the center: {} of {} instances; {} byte-identical to the hospital's files (deflated ones are re-deflated by storescu itself)",
        center.files().len(),
        files.len(),
        identical()
    );
    let direct = echoscu_at(
        Some(&h),
        CENTER_TUNNEL_IP,
        CENTER_DICOM_PORT,
        "MODALITY1",
        "READCENTER",
    );
    println!(
        "echoscu from the hospital straight to the center: {}",
        if direct.status.success() {
            "reached it (unexpected!)"
        } else {
            "no way through: the box does not route"
        }
    );

    section("7. The firewall, seen from outside (nmap)");
    for (ns, target, side) in [
        (site.hospital.name().to_string(), BOX_LAN_IP, "LAN"),
        (site.center.name().to_string(), BOX_WAN_IP, "WAN"),
    ] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nmap", "-Pn", "-n", "-sS"])
            .args(["-p", "1-1024,11112,51820"])
            .arg(target)
            .output()
            .expect("nmap");
        let text = String::from_utf8_lossy(&out.stdout);
        let open: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" open "))
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        println!("{side} {target}: open TCP ports: {open:?}");
    }

    section("8. Power off and on again (no stick): same TPM, same keys");
    vm.shutdown(Duration::from_secs(90));
    vm.boot();
    let ready = vm.wait_console(READY, BOOT);
    println!(
        "{:>5.1} s  kakehashid READY=1 (its keys unsealed by the box's TPM)",
        ready.as_secs_f64()
    );
    let more =
        kakehashi_systest::testdata::ct_study(&data.path().join("again"), "again", 12, 128 * 1024);
    let sent = storescu_with(
        Some(&h),
        BOX_LAN_IP,
        DICOM_PORT,
        "MODALITY1",
        "KAKEHASHI",
        &more,
        &[],
    );
    wait_until(
        "the second study at the center",
        Duration::from_secs(180),
        || center.files().len() >= files.len() + more.len(),
    );
    println!(
        "storescu: {} more acknowledged; at the center now: {} instances",
        sent.acked.len(),
        center.files().len()
    );
    vm.shutdown(Duration::from_secs(90));
    println!("\nDone. The VM, the namespaces and every temporary file are removed on exit.");
}
