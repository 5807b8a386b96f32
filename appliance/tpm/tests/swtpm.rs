//! Against a real (software) TPM: swtpm, and tpm2-tools as the independent
//! reader; openssl as the independent ECDSA verifier.

use std::process::Command;

use kakehashi_systest::tpm::{BusTap, Swtpm};
use kakehashi_tpm::{csr, sha256, Tpm};

/// Loads `identity` with tpm2-tools (as `id.ctx` in `d`), under a primary
/// made from the same template as ours: an independent reader of the TPM.
fn load_with_tools(swtpm: &Swtpm, identity: &kakehashi_tpm::KeyBlob, d: &std::path::Path) {
    load_via(swtpm, &swtpm.tcti(), identity, "id", d);
}

/// Like [`load_with_tools`], through `tcti`, as `<name>.ctx`.
fn load_via(
    swtpm: &Swtpm,
    tcti: &str,
    blob: &kakehashi_tpm::KeyBlob,
    name: &str,
    d: &std::path::Path,
) {
    let (public, private, ctx) = (
        format!("{name}.pub"),
        format!("{name}.priv"),
        format!("{name}.ctx"),
    );
    std::fs::write(d.join(&public), blob.tpm2b_public()).expect("write");
    std::fs::write(d.join(&private), blob.tpm2b_private()).expect("write");
    for args in [
        &[
            "tpm2_createprimary",
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "ecc256:null:aes128cfb",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt|noda",
            "-c",
            "primary.ctx",
        ][..],
        &[
            "tpm2_load",
            "-C",
            "primary.ctx",
            "-u",
            &public,
            "-r",
            &private,
            "-c",
            &ctx,
        ][..],
    ] {
        let out = swtpm.tools_via(tcti, args, d);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn identity_is_what_tpm2_tools_reads_and_its_signatures_verify_with_openssl() {
    let swtpm = Swtpm::start(None);
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open swtpm");
    let identity = tpm.create_identity().expect("identity");
    let point = Tpm::identity_point(&identity).expect("public point");
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let pem = csr::pem("PUBLIC KEY", &csr::spki_der(&point));
    std::fs::write(d.join("ours.pem"), &pem).expect("write");

    // tpm2-tools loads our blob under the same primary and reads its public key.
    drop(tpm);
    load_with_tools(&swtpm, &identity, d);
    let out = swtpm.tools(
        &[
            "tpm2_readpublic",
            "-c",
            "id.ctx",
            "-f",
            "pem",
            "-o",
            "theirs.pem",
        ],
        d,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = std::fs::read_to_string(d.join("theirs.pem")).expect("tpm2_readpublic output");
    assert_eq!(theirs.trim(), pem.trim(), "tpm2_readpublic disagrees");

    // A signature made in the TPM verifies with openssl.
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("reopen");
    let data = b"kakehashi identity check";
    let sig = tpm
        .sign(&identity, "identity", &sha256(data))
        .expect("sign");
    std::fs::write(d.join("data"), data).expect("write");
    std::fs::write(d.join("sig"), &sig).expect("write");
    let out = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            "ours.pem",
            "-signature",
            "sig",
            "data",
        ])
        .current_dir(d)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The CSR verifies too.
    let info = csr::request_info(&point, "KKH-TEST", "Kakehashi");
    let sig = tpm
        .sign(&identity, "identity", &sha256(&info))
        .expect("sign CSR");
    std::fs::write(
        d.join("req.pem"),
        csr::pem("CERTIFICATE REQUEST", &csr::request(&info, &sig)),
    )
    .expect("write");
    let out = Command::new("openssl")
        .args(["req", "-in", "req.pem", "-verify", "-noout", "-subject"])
        .current_dir(d)
        .output()
        .expect("openssl req");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("KKH-TEST"), "{text}");
}

#[test]
fn the_identity_cannot_be_exported() {
    let swtpm = Swtpm::start(None);
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open swtpm");
    let identity = tpm.create_identity().expect("identity");
    drop(tpm);
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    load_with_tools(&swtpm, &identity, d);
    let attrs = swtpm.tools(&["tpm2_readpublic", "-c", "id.ctx"], d);
    let text = String::from_utf8_lossy(&attrs.stdout).to_string();
    assert!(
        text.contains("fixedtpm")
            && text.contains("fixedparent")
            && text.contains("sensitivedataorigin"),
        "{text}"
    );
    // Duplication (the only way a key leaves a TPM) is refused.
    let out = swtpm.tools(
        &[
            "tpm2_duplicate",
            "-C",
            "null",
            "-c",
            "id.ctx",
            "-G",
            "null",
            "-r",
            "dup.priv",
            "-s",
            "dup.seed",
        ],
        d,
    );
    assert!(!out.status.success(), "the identity key was duplicated");
}

#[test]
fn sealed_blobs_unseal_only_on_their_own_tpm() {
    let a = Swtpm::start(None);
    let b = Swtpm::start(None);
    let mut tpm_a = Tpm::open(&a.tcti()).expect("open a");
    let secret = tpm_a.random(32).expect("random");
    let blob = tpm_a.seal(&secret, &[]).expect("seal");
    let back = tpm_a
        .unseal(&blob, "the test secret", "blob")
        .expect("unseal on a");
    assert_eq!(*back, *secret);
    let mut tpm_b = Tpm::open(&b.tcti()).expect("open b");
    let e = tpm_b
        .unseal(&blob, "the test secret", "/x/blob")
        .expect_err("must not unseal on b")
        .to_string();
    assert!(
        e.contains("reset, cleared or replaced") && e.contains("/x/blob"),
        "{e}"
    );
    // Many unseals reuse one password session.
    let t = std::time::Instant::now();
    for _ in 0..20 {
        tpm_a.unseal(&blob, "s", "b").expect("unseal");
    }
    println!(
        "unseal (load + unseal + flush): {:.2} ms each",
        t.elapsed().as_secs_f64() * 1000.0 / 20.0
    );
}

#[test]
fn a_pcr_bound_key_unseals_only_in_the_boot_state_it_was_sealed_in() {
    let swtpm = Swtpm::start(None);
    let work = tempfile::tempdir().expect("tempdir");
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open");
    // PCR 16 is the debug PCR: resettable, so the test can restore it.
    let blob = tpm
        .seal(b"the spool key", &[16])
        .expect("seal with a PCR policy");
    assert_eq!(blob.pcrs, vec![16]);
    let back = kakehashi_tpm::KeyBlob::decode(&blob.encode()).expect("blob round-trips");
    assert_eq!(back, blob);
    assert_eq!(
        &*tpm
            .unseal(&blob, "the spool key", "spool.sealed")
            .expect("same state"),
        b"the spool key"
    );
    drop(tpm);

    // The boot state changes.
    let out = swtpm.tools(
        &["tpm2_pcrextend", &format!("16:sha256={}", "ab".repeat(32))],
        work.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open");
    let e = tpm
        .unseal(&blob, "the spool key", "spool.sealed")
        .expect_err("a changed PCR must refuse")
        .to_string();
    assert!(
        e.contains("PCRs [16]") && e.contains("no longer hold"),
        "{e}"
    );
    drop(tpm);

    // Back to the state it was sealed in: it unseals again.
    let out = swtpm.tools(&["tpm2_pcrreset", "16"], work.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open");
    assert_eq!(
        &*tpm
            .unseal(&blob, "the spool key", "spool.sealed")
            .expect("restored state"),
        b"the spool key"
    );
}

/// A TPM counts a dictionary-attack failure at every start after a power
/// cut if a DA-protected object was used, and locks such objects out at
/// maxTries (3 on swtpm): the box's keys must not be DA-protected, or its
/// relay stops after the third power cut (the image's power-cut test found
/// it). Blobs of version 2 still load.
#[test]
fn keys_still_work_after_many_power_cuts() {
    let mut swtpm = Swtpm::start(None);
    let mut tpm = Tpm::open(&swtpm.tcti()).expect("open");
    let secret = tpm.random(32).expect("random");
    let sealed = tpm.seal(&secret, &[]).expect("seal");
    let identity = tpm.create_identity().expect("identity");
    let old = tpm.seal_as_version_2(&secret).expect("seal v2");
    let old = kakehashi_tpm::KeyBlob::decode(&old.encode()).expect("decode");
    assert!(old.legacy && !sealed.legacy);
    drop(tpm);
    for cut in 1..=6 {
        let mut tpm = Tpm::open(&swtpm.tcti()).expect("open");
        let back = tpm
            .unseal(&sealed, "the sealed key", "blob")
            .unwrap_or_else(|e| panic!("after {} power cuts: {e}", cut - 1));
        assert_eq!(*back, *secret);
        tpm.sign(&identity, "identity", &sha256(b"hello"))
            .unwrap_or_else(|e| panic!("signing after {} power cuts: {e}", cut - 1));
        if cut == 1 {
            // Loads and unseals; after the cuts it would be locked out.
            let back = tpm.unseal(&old, "the v2 key", "old").expect("v2 unseals");
            assert_eq!(*back, *secret);
        }
        drop(tpm);
        swtpm.power_cut();
    }
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Bus sniffing on a stolen box: everything between host and TPM is read
/// by a tap. Sealing, unsealing (with and without a PCR policy) and the
/// TPM's random bytes never show the secret; tpm2-tools unsealing the same
/// blob with a plain session through the same tap does (the control).
#[test]
fn secrets_never_cross_the_tpm_bus_in_clear() {
    let swtpm = Swtpm::start(None);
    let tap = BusTap::start(&swtpm);
    let secret: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let mut tpm = Tpm::open(&tap.tcti()).expect("open through the tap");
    let plain = tpm.seal(&secret, &[]).expect("seal");
    let bound = tpm.seal(&secret, &[16]).expect("seal under PolicyPCR");
    let random = tpm.random(32).expect("random");
    assert_eq!(
        tpm.unseal(&plain, "plain", "-").expect("unseal").as_slice(),
        &secret[..]
    );
    assert_eq!(
        tpm.unseal(&bound, "bound", "-")
            .expect("unseal bound")
            .as_slice(),
        &secret[..]
    );
    drop(tpm);
    let bus = tap.captured();
    assert!(
        bus.len() > 2000,
        "the tap saw the traffic ({} bytes)",
        bus.len()
    );
    for (what, bytes) in [
        ("the sealed secret", &secret[..]),
        ("TPM random bytes", &random[..]),
    ] {
        assert!(
            !holds(&bus, &bytes[..12]),
            "{what} crossed the bus in clear"
        );
    }

    // The control: a plain password session (what kakehashi used before)
    // shows the secret to the same tap.
    tap.clear();
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    load_via(&swtpm, &tap.tcti(), &plain, "s", d);
    let out = swtpm.tools_via(&tap.tcti(), &["tpm2_unseal", "-c", "s.ctx", "-o", "out"], d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(d.join("out")).expect("unsealed"), secret);
    assert!(
        holds(&tap.captured(), &secret[..12]),
        "the tap must see a plain unseal"
    );
}
