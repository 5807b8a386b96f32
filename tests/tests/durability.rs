//! Promise 1: an acknowledged image is never lost — not to kill -9, not to
//! a flood of senders — and a huge instance never sits whole in memory.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kakehashi_systest::testdata::{self, Name, Syntax};
use kakehashi_systest::*;

fn uid(path: &std::path::Path) -> String {
    sop_instance_of_file(&read(path)).expect("uid")
}

#[test]
fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    kill_9_at_random_moments(false);
}

/// The same with the spool sealed (chunked AEAD, sealed Patient IDs).
#[test]
fn kill_9_with_a_sealed_spool_loses_nothing_acknowledged() {
    kill_9_at_random_moments(true);
}

fn kill_9_at_random_moments(sealed: bool) {
    const KILLS: usize = 20;
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let files = testdata::study(
        data.path(),
        "chaos",
        "CT",
        testdata::CT_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        4000,
        4 * 1024,
    )
    .expect("data");
    let center = StoreScp::start(free_port());
    let mut opts = RelayOptions::to(center.port);
    if sealed {
        opts = opts.with_software_keys(keys.path());
    }
    let mut relay = Relay::start(opts);
    let port = relay.port;

    // The hospital keeps sending whatever it has not seen acknowledged.
    let acked: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (acked, done, files) = (Arc::clone(&acked), Arc::clone(&done), files.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            loop {
                let remaining: Vec<PathBuf> = {
                    let a = acked.lock().expect("lock");
                    files.iter().filter(|f| !a.contains(*f)).cloned().collect()
                };
                if remaining.is_empty()
                    || (done.load(std::sync::atomic::Ordering::SeqCst) && rounds > 2000)
                {
                    return rounds;
                }
                let out = storescu(port, "MODALITY1", &remaining);
                acked.lock().expect("lock").extend(out.acked);
                rounds += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Only kills that land while instances are still flowing count.
    let mut kills = 0;
    while kills < KILLS && !sender.is_finished() {
        std::thread::sleep(Duration::from_millis(fastrand::u64(80..400)));
        let before = acked.lock().expect("lock").len();
        if before == files.len() {
            break;
        }
        relay.kill9();
        kills += 1;
        relay.restart();
    }
    assert_eq!(
        kills, KILLS,
        "the transfer ended before {KILLS} kills: make the study bigger"
    );
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = sender.join().expect("sender");
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(
        acked.len(),
        files.len(),
        "the sender got every file acknowledged eventually ({rounds} storescu runs)"
    );
    relay.wait_drained(Duration::from_secs(120));

    let arrived: HashSet<String> = center
        .files()
        .iter()
        .filter_map(|p| sop_instance_of_file(&read(p)))
        .collect();
    let missing: Vec<_> = acked
        .iter()
        .filter(|f| !arrived.contains(&uid(f)))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged instance(s) never arrived, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let requests = center.store_requests();
    let recoveries = relay
        .log_text()
        .matches("spool recovered after an unclean stop")
        .count();
    println!(
        "kill -9 × {kills} during the transfer: {} acknowledged, {} arrived, {} C-STOREs at the center ({} re-sends), {} unclean recoveries, {rounds} storescu runs",
        acked.len(),
        arrived.len(),
        requests,
        requests - arrived.len(),
        recoveries
    );
    assert_eq!(relay.status().destinations[0].dead_letter, 0);
}

#[test]
fn sixteen_senders_at_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    let port = relay.port;
    let senders: Vec<_> = (0..16)
        .map(|i| {
            let dir = data.path().join(format!("s{i}"));
            std::thread::spawn(move || {
                let files = testdata::study(
                    &dir,
                    &format!("par{i}"),
                    "MR",
                    testdata::MR_IMAGE,
                    Syntax::ExplicitLe,
                    Name::Iso2022Jp,
                    15,
                    32 * 1024,
                )
                .expect("data");
                let out = storescu(port, "MODALITY1", &files);
                (files.len(), out.acked.len(), out.output)
            })
        })
        .collect();
    for s in senders {
        let (n, acked, output) = s.join().expect("sender");
        assert_eq!(acked, n, "{output}");
    }
    relay.wait_drained(Duration::from_secs(120));
    assert_eq!(center.files().len(), 16 * 15);
    let log = relay.log_text();
    assert!(
        !log.contains("too many concurrent"),
        "16 associations fit the default limit"
    );
}

#[test]
fn a_several_hundred_mb_instance_relays_with_small_memory() {
    big_instance(false);
}

/// Sealed: checked to its last chunk, then streamed; memory stays small.
#[test]
fn a_several_hundred_mb_sealed_instance_relays_with_small_memory() {
    big_instance(true);
}

fn big_instance(sealed: bool) {
    const SIZE: usize = 320 * 1024 * 1024;
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let file = testdata::study(
        data.path(),
        "tomo",
        "MG",
        testdata::MG_IMAGE,
        Syntax::ExplicitLe,
        Name::Utf8,
        1,
        SIZE,
    )
    .expect("data")
    .remove(0);
    let center = StoreScp::start(free_port());
    let mut opts = RelayOptions::to(center.port);
    if sealed {
        opts = opts.with_software_keys(keys.path());
    }
    let relay = Relay::start(opts);
    let out = storescu(relay.port, "MODALITY1", std::slice::from_ref(&file));
    assert_eq!(out.acked.len(), 1, "{}", out.output);
    relay.wait_drained(Duration::from_secs(300));
    let peak = peak_rss(relay.pid()).expect("VmHWM");
    let arrived = center.files();
    assert_eq!(arrived.len(), 1);
    let (a, b) = (read(&arrived[0]), read(&file));
    assert!(
        testdata::dataset_of_file(&a) == testdata::dataset_of_file(&b),
        "byte-identical"
    );
    println!(
        "instance of {} MiB relayed (sealed spool: {sealed}); kakehashid peak RSS {} MiB",
        b.len() >> 20,
        peak >> 20
    );
    assert!(
        peak < 96 * 1024 * 1024,
        "peak RSS {} MiB must stay far below the instance size",
        peak >> 20
    );
}
