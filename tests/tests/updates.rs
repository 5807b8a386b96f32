//! Signed A/B updates of the appliance image (docs/updates.md), in qemu
//! with swtpm as in `appliance.rs`: a box provisioned from its USB stick
//! takes a bundle from the stick, installs it into the slot that did not
//! boot, restarts into it, checks its health and is marked good; what it
//! had acknowledged before is delivered after. Bundles that are unsigned,
//! signed by another key, or older are refused and change nothing.
//!
//! The releases are made from the image's own tree by
//! `image-build/variant.sh` (another version; `make image` must have run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kakehashi_systest::netns::*;
use kakehashi_systest::testdata;
use kakehashi_systest::vm::{
    center_scp, site_toml, wait_delivered, BoxVm, Image, BOOT, DICOM_PORT, DONE, READY,
    STORESCU_TIMEOUTS,
};
use kakehashi_systest::*;

/// A release of the image's tree as `version` (`variant.sh`), in `dir`.
fn release(dir: &Path, version: &str, kind: &str) -> PathBuf {
    let out = dir.join(format!("{version}-{kind}"));
    let image = Image::get();
    let status = Command::new(workspace_root().join("image-build/variant.sh"))
        .args([version, &out.to_string_lossy(), kind])
        .env("KAKEHASHI_IMAGE_OUT", &image.dir)
        .status()
        .expect("variant.sh");
    assert!(status.success(), "variant.sh {version} {kind} failed");
    out.join(format!("kakehashi-{version}.raucb"))
}

/// A small bundle (a few KiB of root) with `version`, signed with
/// `key`/`cert`, or with no signature at all: enough to be refused.
fn small_bundle(dir: &Path, name: &str, version: &str, signer: Option<(&Path, &Path)>) -> PathBuf {
    let stage = dir.join(format!("{name}-stage"));
    std::fs::create_dir_all(&stage).expect("stage");
    // Incompressible: RAUC wants a payload larger than one block.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(stage.join("root.img"), noise).expect("root");
    std::fs::write(stage.join("root-verity.img"), vec![0u8; 4096]).expect("verity");
    std::fs::write(
        stage.join("manifest.raucm"),
        format!(
            "[update]\ncompatible=kakehashi-appliance-x86_64\nversion={version}\n\n[bundle]\nformat=verity\n\n[image.rootfs]\nfilename=root.img\n\n[image.verity]\nfilename=root-verity.img\n"
        ),
    )
    .expect("manifest");
    let bundle = dir.join(format!("{name}.raucb"));
    let keys = workspace_root().join("image-build/keys");
    let (test_key, test_cert) = (
        keys.join("TEST-ONLY-update.key"),
        keys.join("TEST-ONLY-update.crt"),
    );
    let (key, cert) = signer.unwrap_or((&test_key, &test_cert));
    let out = Command::new("rauc")
        .arg("bundle")
        .arg(format!("--cert={}", cert.display()))
        .arg(format!("--key={}", key.display()))
        .arg(&stage)
        .arg(&bundle)
        .output()
        .expect("rauc");
    assert!(out.status.success(), "rauc bundle: {out:?}");
    if signer.is_none() && name.contains("unsigned") {
        // The squashfs alone: a bundle ends with its CMS signature and
        // the signature's size (8 bytes, big-endian).
        let bytes = std::fs::read(&bundle).expect("bundle");
        let n = bytes.len();
        let sig = u64::from_be_bytes(bytes[n - 8..].try_into().expect("8 bytes")) as usize;
        std::fs::write(&bundle, &bytes[..n - 8 - sig]).expect("strip");
    }
    bundle
}

/// Another signing key: a valid bundle signer, not the one the box trusts.
fn foreign_key(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join("other.key"), dir.join("other.crt"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-subj",
            "/O=Someone else/CN=not the Kakehashi update key",
            "-days",
            "30",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {out:?}");
    (key, cert)
}

/// The medium's summary of its last visit, from the console past `mark`.
fn summary(vm: &mut BoxVm, mark: u64) -> String {
    vm.wait_console_after(mark, "the medium can be removed", BOOT);
    // The summary as written to the console (the journal echoes it later,
    // line by line).
    let text = vm.console_after(mark);
    let start = text.find("KAKEHASHI — provisioning medium").unwrap_or(0);
    let end = text[start..]
        .find("the medium can be removed")
        .map_or(text.len(), |e| start + e);
    text[start..end].to_string()
}

/// Plugs the stick holding `bundle` (and `reboot-now` if asked) into the
/// running box; the console past the returned mark shows what it did.
fn offer(vm: &mut BoxVm, bundle: Option<&Path>, now: bool) -> u64 {
    vm.unplug_medium();
    // Not a provisioning visit: no site file.
    for f in ["site.toml", "update.raucb", "reboot-now"] {
        vm.remove_from_medium(f);
    }
    if let Some(b) = bundle {
        vm.put_on_medium(b, "update.raucb");
    }
    if now {
        let flag = vm.dir.path().join("reboot-now");
        std::fs::write(&flag, "").expect("flag");
        vm.put_on_medium(&flag, "reboot-now");
    }
    let mark = vm.mark();
    vm.plug_medium();
    mark
}

#[test]
#[ignore = "not passing yet: the last run got RAUC as far as its status file (/var/lib/rauc missing, tmpfiles entry added since, not yet rerun)"]
fn a_signed_update_installs_boots_is_marked_good_and_refused_bundles_change_nothing() {
    let image = Image::get();
    let work = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let v2 = release(work.path(), "0.2.0", "good");
    let (key, cert) = foreign_key(work.path());
    let unsigned = small_bundle(work.path(), "unsigned", "0.9.0", None);
    let foreign = small_bundle(work.path(), "foreign", "0.9.0", Some((&key, &cert)));
    let older = small_bundle(work.path(), "older", "0.1.9", None);
    println!("releases made in {:.0} s", t.elapsed().as_secs_f64());

    let mut site = Site::new();
    site.for_vm();
    let scp = center_scp(&site);
    let h = site.hospital.name().to_string();
    let data = tempfile::tempdir().expect("tempdir");
    let mut vm = BoxVm::new(&image, Some(&site));

    // ---- v1: provisioned from the stick, relaying.
    vm.insert_medium(Some(&site_toml(&site)));
    vm.boot();
    vm.wait_console(DONE, BOOT);
    let serial = vm
        .medium_serials()
        .first()
        .cloned()
        .expect("a result directory");
    let wg = vm
        .medium_file(&format!("kakehashi/{serial}/wireguard.pub"))
        .expect("wireguard.pub");
    site.set_box_public(wg.trim());
    // A study from the hospital, every instance acknowledged by the box.
    let send = |name: &str, n: usize| {
        let files = testdata::ct_study(&data.path().join(name), name, n, 100 * 1024);
        let out = storescu_with(
            Some(&h),
            BOX_LAN_IP,
            DICOM_PORT,
            "MODALITY1",
            "KAKEHASHI",
            &files,
            STORESCU_TIMEOUTS,
        );
        assert_eq!(out.acked.len(), files.len(), "storescu: {}", out.output);
        files
    };
    let first = send("first", 6);
    wait_delivered(&scp, &first, Duration::from_secs(120));

    // The center's DICOM service is down: a second study is acknowledged
    // by the box and waits in its spool across the update.
    drop(scp);
    let second = send("second", 8);

    // ---- v2 from the stick, restart at once.
    let t = Instant::now();
    let mark = offer(&mut vm, Some(&v2), true);
    let said = summary(&mut vm, mark);
    println!("{said}");
    assert!(said.contains("installed 0.2.0 into slot b"), "{said}");
    let installed = t.elapsed();
    vm.wait_console_after(mark, "root filesystem of slot b verified", BOOT);
    let ready = vm.wait_console_after(mark, READY, BOOT);
    println!(
        "installed in {:.0} s (stick plugged to summary); v2 up {:.0} s later",
        installed.as_secs_f64(),
        ready.as_secs_f64() - installed.as_secs_f64()
    );

    // Everything acknowledged before the update reaches the center.
    let scp = center_scp(&site);
    wait_delivered(&scp, &second, Duration::from_secs(180));

    // Marked good, and the outcome says so.
    let mark = offer(&mut vm, None, false);
    let said = summary(&mut vm, mark);
    println!("{said}");
    for needle in [
        "slot a: good, version 0.1.0",
        "slot b: good, version 0.2.0 (booted)",
        "last update: succeeded 0.2.0 into slot b",
        "health of slot b (0.2.0): passed",
    ] {
        assert!(said.contains(needle), "missing {needle:?} in:\n{said}");
    }

    // ---- Refused, each with its reason; nothing changes, no restart.
    for (bundle, why) in [
        (&unsigned, "not signed by a key this box trusts"),
        (&foreign, "not signed by a key this box trusts"),
        (&older, "is not newer than"),
    ] {
        let mark = offer(&mut vm, Some(bundle), true);
        let said = summary(&mut vm, mark);
        println!("{said}");
        assert!(
            said.contains("UPDATE REFUSED OR FAILED") && said.contains(why),
            "{why:?}:\n{said}"
        );
        assert!(
            said.contains("slot b: good, version 0.2.0 (booted)")
                && said.contains("last update: succeeded 0.2.0"),
            "{said}"
        );
        assert!(!vm.console_after(mark).contains("reboot: Restarting system"));
    }
    vm.shutdown(Duration::from_secs(60));
}
