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
        sources: vec![SourceRule { ae_title: "MODALITY1".into(), address: None }],
        max_pdu: 65536,
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
        let _ = (c.command_field(), c.message_id(), c.status(), c.priority(), c.has_dataset());
        let _ = (c.affected_sop_class(), c.affected_sop_instance(), c.error_comment());
    }
}

/// The routing-key scan of a dataset prefix, in each kind of syntax.
pub fn scan(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let ts = match selector % 4 {
        0 => "1.2.840.10008.1.2",
        1 => "1.2.840.10008.1.2.1",
        2 => "1.2.840.10008.1.2.2",
        _ => "1.2.840.10008.1.2.1.99",
    };
    let _ = scan::routing_keys(ts, rest);
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
        let again: kakehashi_spool::InstanceRecord = decode(&encode(&r)).expect("re-encoded record decodes");
        assert_eq!(again, r);
    }
    let _ = decode::<kakehashi_spool::AuditRecord>(data);
}
