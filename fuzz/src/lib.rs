//! Fuzz target bodies for every decoder that faces the network or the disk.
//! Each must return (never panic, never hang) on any input. The libFuzzer
//! binaries in `fuzz_targets/` call these; `tests/smoke.rs` runs them over
//! seeds and mutations on stable Rust in `make test`.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use kakehashi_dicom::negotiate::{negotiate, Policy, SourceRule};
use kakehashi_dicom::{dimse, scan, wire};

/// Reading from a byte slice never waits, so one poll finishes the future.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a read from memory was pending"),
    }
}

/// PDUs as they arrive on the box's DICOM port, and negotiation of any
/// association request among them.
pub fn pdu(data: &[u8]) {
    let mut input = data;
    let mut buf = bytes::BytesMut::new();
    let policy = Policy {
        ae_title: "KAKEHASHI".into(),
        sources: vec![SourceRule {
            ae_title: "MODALITY1".into(),
            address: None,
        }],
        max_pdu: 65536,
        sources_key: "dicom.sources",
        storage_classes: None,
        query_retrieve: data.first().is_some_and(|b| b & 1 == 1),
    };
    for _ in 0..16 {
        match ready(wire::read_pdu(&mut input, &mut buf, 65536)) {
            Ok(dicom_ul::Pdu::AssociationRQ(rq)) => {
                let _ = negotiate(&rq, IpAddr::V4(Ipv4Addr::LOCALHOST), &policy, false);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // The ingress's own P-DATA splitter, on the same bytes.
    let mut input = data;
    for _ in 0..16 {
        if ready(wire::read_frame(&mut input, &mut buf, 65536)).is_err() {
            break;
        }
    }
}

/// DIMSE command sets.
pub fn command(data: &[u8]) {
    if let Ok(c) = dimse::Command::parse(data) {
        let _ = (
            c.command_field(),
            c.message_id(),
            c.status(),
            c.priority(),
            c.has_dataset(),
        );
        let _ = (
            c.affected_sop_class(),
            c.affected_sop_instance(),
            c.error_comment(),
        );
    }
}

/// The routing-key scan of a dataset prefix, in each kind of syntax.
pub fn scan(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let ts = match selector % 4 {
        0 => "1.2.840.10008.1.2",
        1 => "1.2.840.10008.1.2.1",
        2 => "1.2.840.10008.1.2.2",
        _ => "1.2.840.10008.1.2.1.99",
    };
    let _ = scan::routing_keys(ts, rest);
    let _ = scan::report_facts(ts, rest);
    // A result's signatures are parsed from the whole dataset: never a panic.
    let _ = kakehashi_dicom::signature::verify(
        ts,
        rest,
        &kakehashi_dicom::signature::TrustedSigners::default(),
    );
}

/// Query/retrieve identifiers as a PACS answers a C-FIND (and, later, as
/// the center asks one): what decodes re-encodes to something that decodes
/// to the same values.
pub fn identifier(data: &[u8]) {
    if let Some(id) = kakehashi_dicom::query::Identifier::decode(data) {
        let again = kakehashi_dicom::query::Identifier::decode(&id.encode());
        assert_eq!(
            again.as_ref(),
            Some(&id),
            "an identifier changed on re-encode"
        );
    }
}

/// The site configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kakehashi_config::Config::parse(text);
    }
}

/// Spool index records as read back from disk; what decodes must re-encode
/// to something that decodes to the same value.
pub fn record(data: &[u8]) {
    use kakehashi_spool::record::{decode, encode};
    if let Ok(r) = decode::<kakehashi_spool::InstanceRecord>(data) {
        let again: kakehashi_spool::InstanceRecord =
            decode(&encode(&r)).expect("re-encoded record decodes");
        assert_eq!(again, r);
    }
    let _ = decode::<kakehashi_spool::AuditRecord>(data);
}

/// The SCP's association state machine driven by a script of events: each
/// step is a PDV (context, flags, bytes), a release, or a store outcome;
/// some PDVs carry a well-formed C-STORE-RQ or C-ECHO-RQ so the script
/// reaches deep states. The machine must keep its rules whatever comes.
pub fn association(data: &[u8]) {
    use kakehashi_dicom::negotiate::AcceptedContext;
    use kakehashi_dicom::scp::{Action, Scp};
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    let contexts = vec![
        AcceptedContext {
            id: 1,
            abstract_syntax: CT.into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
        },
        AcceptedContext {
            id: 3,
            abstract_syntax: CT.into(),
            transfer_syntax: "1.2.840.10008.1.2".into(),
        },
        AcceptedContext {
            id: 5,
            abstract_syntax: "1.2.840.10008.1.1".into(),
            transfer_syntax: "1.2.840.10008.1.2".into(),
        },
        AcceptedContext {
            id: 7,
            abstract_syntax: kakehashi_dicom::query::STUDY_ROOT_FIND.into(),
            transfer_syntax: "1.2.840.10008.1.2".into(),
        },
    ];
    let ids: Vec<u8> = contexts.iter().map(|c| c.id).collect();
    let mut scp = Scp::new(contexts);
    let mut input = data;
    // Invariants, checked on every action.
    let mut storing: Option<u8> = None; // context of the C-STORE in transfer
    let mut committing: Option<u8> = None; // context of the C-STORE awaiting `stored`
    let mut closed = false;
    let mut check =
        |actions: Vec<Action>, committing: &mut Option<u8>, storing: &mut Option<u8>| {
            for a in actions {
                assert!(
                    !closed || matches!(a, Action::Abort(_)),
                    "action after close: {a:?}"
                );
                match a {
                    Action::Command { pc, bytes } => {
                        assert!(
                            ids.contains(&pc),
                            "response on context {pc}, never accepted"
                        );
                        let rsp = kakehashi_dicom::dimse::Command::parse(&bytes)
                            .expect("our own command set parses");
                        if rsp.command_field() == Ok(kakehashi_dicom::dimse::C_STORE_RSP) {
                            if let Some(want) = committing.take() {
                                assert_eq!(pc, want, "C-STORE-RSP not on its request's context");
                            }
                        }
                    }
                    Action::StoreBegin(r) => {
                        assert!(
                            storing.is_none() && committing.is_none(),
                            "two stores at once"
                        );
                        *storing = Some(r.context.id);
                    }
                    Action::StoreData(_) => assert!(storing.is_some(), "data outside a store"),
                    Action::StoreEnd { .. } => {
                        *committing = Some(storing.take().expect("end without begin"));
                    }
                    Action::Refused { .. } => {}
                    Action::Query(q) => {
                        assert!(
                            ids.contains(&q.context.id),
                            "a query on an unaccepted context"
                        );
                        assert!(
                            storing.is_none() && committing.is_none(),
                            "a query during a store"
                        );
                    }
                    Action::Release | Action::Abort(_) => closed = true,
                }
            }
        };
    for _ in 0..64 {
        let Some((&op, rest)) = input.split_first() else {
            break;
        };
        input = rest;
        let actions = match op % 8 {
            0 => scp.on_release(),
            1 => {
                scp.answered();
                scp.stored(u16::from(op) << 8, None)
            }
            2 | 3 => {
                let pc = [1, 3, 5, 7][usize::from(op >> 4) % 4];
                let rq = if op & 0x40 != 0 {
                    kakehashi_dicom::dimse::c_find_rq(
                        u16::from(op),
                        kakehashi_dicom::query::STUDY_ROOT_FIND,
                        0,
                    )
                } else if op & 1 == 0 {
                    kakehashi_dicom::dimse::c_store_rq(u16::from(op), CT, "1.2.3.4", 0)
                } else {
                    kakehashi_dicom::dimse::c_echo_rq(u16::from(op))
                };
                scp.on_pdv(wire::Pdv {
                    pc_id: pc,
                    command: true,
                    last: true,
                    data: bytes::Bytes::from(rq),
                })
            }
            _ => {
                let Some((&head, rest)) = input.split_first() else {
                    break;
                };
                let len = usize::from(head >> 2).min(rest.len());
                let (chunk, rest) = rest.split_at(len);
                input = rest;
                scp.on_pdv(wire::Pdv {
                    pc_id: [1, 3, 5, 9][usize::from(op >> 3) % 4],
                    command: head & 1 != 0,
                    last: head & 2 != 0,
                    data: bytes::Bytes::copy_from_slice(chunk),
                })
            }
        };
        check(actions, &mut committing, &mut storing);
    }
}

/// A sealed payload as read back from disk: tampering, truncation, another
/// key or version must be an error, never a panic; what opens must be what
/// was sealed.
pub fn seal(data: &[u8]) {
    use kakehashi_spool::seal::{SealReader, SealWriter};
    use kakehashi_spool::SpoolKey;
    use std::io::{Read, Write};
    let key = SpoolKey::new(zeroize::Zeroizing::new([7u8; 32]));
    if data.len() >= 4 {
        let mut out = Vec::new();
        if let Ok(mut r) = SealReader::new(&data[4..], &key, 42, "1.2.3") {
            let _ = r.read_to_end(&mut out);
        }
    }
    // Round trip of the input as plaintext.
    let mut w = SealWriter::new(Vec::new(), &key, 42, "1.2.3").expect("writer");
    w.write_all(data).expect("seal");
    let sealed = w.finish().expect("finish");
    let mut back = Vec::new();
    SealReader::new(&sealed[4..], &key, 42, "1.2.3")
        .and_then(|mut r| r.read_to_end(&mut back))
        .expect("opens");
    assert_eq!(back, data);
}

/// TPM key blobs as read from the key directory.
pub fn keyblob(data: &[u8]) {
    use kakehashi_tpm::KeyBlob;
    if let Some(b) = KeyBlob::decode(data) {
        assert_eq!(
            KeyBlob::decode(&b.encode()),
            Some(b.clone()),
            "re-encoded blob decodes"
        );
        let _ = kakehashi_tpm::Tpm::identity_point(&b);
    }
}

/// The provisioning site file, and the config it makes.
pub fn site(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(site) = kakehashi_config::site::Site::parse(text) {
            let _ = kakehashi_config::Config::parse(
                &site.config_text(std::path::Path::new("site.toml")),
            );
        }
    }
}

/// What a destination answers the forwarder's SCU: the reply to its
/// A-ASSOCIATE-RQ, then the PDUs carrying a response.
pub fn scu(data: &[u8]) {
    use dicom_ul::pdu::PresentationContextProposed;
    use kakehashi_dicom::scu::{negotiated, MessageReader, ResponseReader};
    let proposed = vec![PresentationContextProposed {
        id: 1,
        abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
        transfer_syntaxes: vec!["1.2.840.10008.1.2.1".into()],
    }];
    let mut input = data;
    let mut buf = bytes::BytesMut::new();
    let Ok(reply) = ready(wire::read_pdu(&mut input, &mut buf, 65536)) else {
        return;
    };
    if let Ok(n) = negotiated(reply, &proposed, "CENTER@test") {
        for c in &n.contexts {
            assert!(
                c.id == 1 && c.transfer_syntax == "1.2.840.10008.1.2.1",
                "only what was proposed: {c:?}"
            );
        }
    }
    let after_reply = input;
    let mut reader = ResponseReader::default();
    for _ in 0..16 {
        let Ok(pdu) = ready(wire::read_pdu(&mut input, &mut buf, 65536)) else {
            break;
        };
        match reader.push(pdu, "CENTER@test", "waiting for C-STORE-RSP") {
            Ok(Some(c)) => {
                let _ = (c.status(), c.responded_to(), c.error_comment());
                break;
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    // The same PDUs as C-FIND/C-MOVE responses (command, then a dataset).
    let mut input = after_reply;
    let mut reader = MessageReader::default();
    for _ in 0..16 {
        let Ok(pdu) = ready(wire::read_pdu(&mut input, &mut buf, 65536)) else {
            break;
        };
        match reader.push(pdu, "PACS@test", "waiting for C-FIND-RSP") {
            Ok(messages) => {
                for (c, data, _pc) in messages {
                    let _ = (c.status(), c.sub_operations(), c.has_dataset());
                    if let Some(d) = data {
                        let _ = kakehashi_dicom::query::Identifier::decode(&d);
                    }
                }
            }
            Err(_) => break,
        }
    }
}
