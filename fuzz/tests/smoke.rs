//! Each fuzz target over valid seeds, then thousands of mutations of them
//! and of random bytes, with a fixed seed so a failure reproduces.

use kakehashi_fuzz as f;

const ROUNDS: usize = 20_000;

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.usize(1..8) {
        match rng.u8(0..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v[i] ^= 1 << rng.u8(0..8);
            }
            1 if !v.is_empty() => v.truncate(rng.usize(0..v.len())),
            2 => {
                let i = rng.usize(0..=v.len());
                v.insert(i, rng.u8(..));
            }
            3 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v[i] = [0x00, 0xFF, 0x7F, 0x80][rng.usize(0..4)];
            }
            _ => v.extend((0..rng.usize(0..16)).map(|_| rng.u8(..))),
        }
    }
    v
}

fn run(target: fn(&[u8]), seeds: &[Vec<u8>]) {
    let mut rng = fastrand::Rng::with_seed(0x4b414b45);
    for s in seeds {
        target(s);
    }
    for i in 0..ROUNDS {
        let input = if i % 5 == 0 {
            (0..rng.usize(0..512)).map(|_| rng.u8(..)).collect()
        } else {
            mutate(&mut rng, &seeds[i % seeds.len()])
        };
        target(&input);
    }
}

fn association_rq() -> Vec<u8> {
    use dicom_ul::pdu::*;
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "MODALITY1".into(),
        called_ae_title: "KAKEHASHI".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2.1".into(), "1.2.840.10008.1.2".into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    });
    let mut out = Vec::new();
    dicom_ul::pdu::write_pdu(&mut out, &rq).expect("encode");
    out
}

fn pdata(command: &[u8]) -> Vec<u8> {
    pdv(command, true)
}

fn pdv(bytes: &[u8], is_command: bool) -> Vec<u8> {
    let mut frame = vec![0u8; kakehashi_dicom::wire::PDATA_OVERHEAD + bytes.len()];
    frame[kakehashi_dicom::wire::PDATA_OVERHEAD..].copy_from_slice(bytes);
    kakehashi_dicom::wire::frame_pdata(&mut frame, 1, is_command, true);
    frame
}

#[test]
fn pdu() {
    let store = kakehashi_dicom::dimse::c_store_rq(1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0);
    let mut conversation = association_rq();
    conversation.extend(pdata(&store));
    conversation.extend([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]); // A-RELEASE-RQ
    run(f::pdu, &[association_rq(), pdata(&store), conversation]);
}

#[test]
fn command() {
    run(
        f::command,
        &[
            kakehashi_dicom::dimse::c_store_rq(7, "1.2.840.10008.5.1.4.1.1.4", "1.2.3", 1),
            kakehashi_dicom::dimse::c_store_rsp(7, "1.2", "1.2.3", 0xA700, Some("spool full")),
            kakehashi_dicom::dimse::c_echo_rq(1),
        ],
    );
}

#[test]
fn scan() {
    // explicit LE: charset, a sequence of undefined length, patient ID, study UID
    let mut ds = vec![1u8];
    ds.extend(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 192");
    ds.extend(b"\x08\x00\x32\x10SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff");
    ds.extend(b"\x08\x00\x00\x01SH\x06\x00RPID16\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00");
    ds.extend(b"\x10\x00\x20\x00LO\x04\x00P001\x20\x00\x0d\x00UI\x06\x001.2.3\x00");
    let mut implicit = vec![0u8];
    implicit.extend(b"\x10\x00\x20\x00\x04\x00\x00\x00P001\x20\x00\x0d\x00\xff\xff\xff\xff");
    // A report signed by dcmsign (the signature module's fixture).
    let file = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../appliance/dicom/tests/data/rsa-sha256.dcm"
    ))
    .expect("fixture");
    let meta_len = u32::from_le_bytes([file[140], file[141], file[142], file[143]]) as usize;
    let mut signed = vec![1u8];
    signed.extend(&file[144 + meta_len..]);
    run(f::scan, &[ds, implicit, signed]);
}

#[test]
fn identifier() {
    use kakehashi_dicom::query::{tag, Identifier};
    let find = Identifier::new()
        .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
        .with(tag::PATIENT_ID, "PID-A")
        .with(tag::STUDY_INSTANCE_UID, "")
        .with(tag::MODALITIES_IN_STUDY, "")
        .encode();
    let answer = Identifier::new()
        .with(tag::STUDY_INSTANCE_UID, "1.2.3.4")
        .with(tag::STUDY_DATE, "20250102")
        .with(tag::MODALITIES_IN_STUDY, "CT\\SR")
        .encode();
    // A sequence of undefined length in an answer (skipped).
    let mut seq = answer.clone();
    seq.extend(b"\x08\x00\x15\x11\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff");
    seq.extend(b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00");
    run(f::identifier, &[find, answer, seq]);
}

#[test]
fn config() {
    let seeds: Vec<Vec<u8>> = ["kakehashi.toml", "minimal.toml"]
        .iter()
        .map(|n| {
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/").to_string() + n)
                .expect("example config")
        })
        .collect();
    run(f::config, &seeds);
}

#[test]
fn record() {
    use kakehashi_spool::*;
    let rec = InstanceRecord {
        id: 42,
        meta: InstanceMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3.4".into(),
            transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
            study_instance_uid: "1.2.3".into(),
            patient_id: "P1".into(),
            source_ae: "MODALITY1".into(),
            source_ip: "127.0.0.1".into(),
            priority: Priority::High,
            role: Default::default(),
            amendment: false,
            arrival: Default::default(),
        },
        dataset_size: 1000,
        dataset_offset: 200,
        sha256: "00".repeat(32),
        received_ms: 1,
        stored_size: Some(1240),
        segment: Some(Location { seg: 3, at: 4608 }),
        key_id: Some("00112233aabbccdd".into()),
        routes: vec![Route {
            destination: "center".into(),
            state: RouteState::Queued,
            attempts: 2,
            next_attempt_ms: 3,
            last_error: Some("0xA700".into()),
            delivered_ms: None,
            stuck_ms: Some(9),
        }],
    };
    run(f::record, &[kakehashi_spool::record::encode(&rec)]);
}

#[test]
fn association() {
    // Scripts (see f::association for the encoding): a C-STORE on context
    // 3, one last data fragment, its outcome; an echo on 5, a release; a
    // C-STORE on 1 in two fragments, its outcome, a release.
    run(
        f::association,
        &[
            vec![0x12, 0x0c, 0x06, b'a', 0x01],
            vec![0x23, 0x00],
            vec![0x02, 0x04, 0x04, b'x', 0x04, 0x06, b'y', 0x01, 0x00],
        ],
    );
}

#[test]
fn seal() {
    use kakehashi_spool::seal::SealWriter;
    use std::io::Write;
    let key = kakehashi_spool::SpoolKey::new(zeroize::Zeroizing::new([7u8; 32]));
    let mut w = SealWriter::new(Vec::new(), &key, 42, "1.2.3").expect("writer");
    w.write_all(&[0x5a; 300]).expect("write");
    let sealed = w.finish().expect("finish");
    run(f::seal, &[sealed, b"KKSE\x01abcdefg".to_vec(), Vec::new()]);
}

#[test]
fn keyblob() {
    let blob = kakehashi_tpm::KeyBlob {
        public: vec![0, 0x23, 0, 0x0b, 1, 2],
        private: vec![9; 40],
        pcrs: vec![7, 16],
        legacy: false,
    };
    let mut v1 = b"KKTB\x01".to_vec();
    for part in [&blob.public, &blob.private] {
        v1.extend_from_slice(&(part.len() as u32).to_be_bytes());
        v1.extend_from_slice(part);
    }
    run(f::keyblob, &[blob.encode(), v1]);
}

#[test]
fn site() {
    let seed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../provisioning/site.toml"
    ))
    .expect("site file");
    run(f::site, &[seed]);
}

#[test]
fn scu() {
    use dicom_ul::pdu::*;
    let ac = Pdu::AssociationAC(AssociationAC {
        protocol_version: 1,
        calling_ae_title: "KAKEHASHI".into(),
        called_ae_title: "CENTER".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextResult {
            id: 1,
            reason: PresentationContextResultReason::Acceptance,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
        }],
        user_variables: vec![UserVariableItem::MaxLength(4096)],
    });
    let mut seed = Vec::new();
    dicom_ul::pdu::write_pdu(&mut seed, &ac).expect("encode");
    let rsp = kakehashi_dicom::dimse::c_store_rsp(
        1,
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.3",
        0xA700,
        Some("full"),
    );
    let mut store = seed.clone();
    store.extend(pdata(&rsp));
    // A command that announces a dataset, then the dataset: an answer.
    use kakehashi_dicom::query::{tag, Identifier};
    let mut find = seed;
    find.extend(pdata(&kakehashi_dicom::dimse::c_find_rq(
        1,
        kakehashi_dicom::query::STUDY_ROOT_FIND,
        0,
    )));
    let answer = Identifier::new()
        .with(tag::STUDY_INSTANCE_UID, "1.2.3")
        .with(tag::MODALITIES_IN_STUDY, "CT");
    find.extend(pdv(&answer.encode(), false));
    run(f::scu, &[store, find]);
}
