//! Promise 1: an acknowledged image is never lost — not to kill -9, not to
//! a flood of senders — and a huge instance never sits whole in memory.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kakehashi_systest::testdata::{self, ct_study, Name, Syntax};
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
        peak < 24 * 1024 * 1024,
        "peak RSS {} MiB: the instance is streamed, never held (README: about 12 MiB; the bound is twice that)",
        peak >> 20
    );
}

/// What an acknowledgement relies on: before the C-STORE-RSP leaves, the
/// frame holding the instance (payload, log entry, then its header) was
/// flushed with `fdatasync` after its header was written. kill -9 cannot
/// catch a missing flush (the page cache survives it), so the order of the
/// syscalls is read with strace; the image's power-cut test proves the same
/// end to end.
#[test]
fn a_frame_is_flushed_before_its_instance_is_acknowledged() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = ct_study(data.path(), "order", 5, 64 * 1024);
    // The center is down: nothing but receptions touches the spool.
    let relay = Relay::start(RelayOptions::to(free_port()));
    let trace = data.path().join("strace.txt");
    let strace = Proc(
        std::process::Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-yy",
                "-e",
                "trace=pwrite64,fdatasync,fsync,sendto,write,writev",
                "-o",
            ])
            .arg(&trace)
            .arg("-p")
            .arg(relay.pid().to_string())
            .spawn()
            .expect("strace (apt-get install strace)"),
    );
    // strace prints nothing until attached; give it a moment.
    wait_until("strace to attach", Duration::from_secs(10), || {
        std::fs::metadata(&trace).is_ok()
    });
    std::thread::sleep(Duration::from_millis(500));
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(out.acked.len(), 5, "{}", out.output);
    std::thread::sleep(Duration::from_millis(300));
    drop(strace);
    let text = std::fs::read_to_string(&trace).expect("trace");
    let events = parse_strace(&text);
    let segments = relay
        .spool_dir()
        .canonicalize()
        .expect("spool dir")
        .join("seg");
    // `-yy` names a socket `TCP:[local->peer]`; the parser cuts at the first
    // `>`, so the local end and the `-` remain.
    let port = format!(":{}-", relay.port);
    let in_segment = |e: &Event| e.path.as_ref().is_some_and(|p| p.starts_with(&segments));

    // Per segment: a frame header written and not flushed since.
    let mut unflushed: Vec<PathBuf> = Vec::new();
    let mut flushed_frames = 0;
    let mut responses = 0;
    for e in events.iter().filter(|e| e.done) {
        let header = e.call == "pwrite64" && in_segment(e) && e.args.contains(", 512, ");
        if header {
            unflushed.push(e.path.clone().expect("path"));
        } else if e.call == "fdatasync" && in_segment(e) {
            let before = unflushed.len();
            unflushed.retain(|p| Some(p) != e.path.as_ref());
            flushed_frames += before - unflushed.len();
        } else if ["sendto", "write", "writev"].contains(&e.call.as_str())
            && e.path
                .as_ref()
                .is_some_and(|p| p.to_string_lossy().contains(&port))
        {
            // A PDU to the sender on the association (the C-STORE-RSP, or
            // the A-ASSOCIATE-AC / A-RELEASE-RP): no frame may be waiting.
            assert!(
                unflushed.is_empty(),
                "a response left while a frame header in {unflushed:?} was not flushed: \
                 a power cut then loses an acknowledged instance\n{text}"
            );
            responses += 1;
        }
    }
    assert_eq!(
        flushed_frames, 5,
        "every instance's frame was written and flushed:\n{text}"
    );
    assert!(responses >= 5, "the responses were seen:\n{text}");
}

/// One syscall line of `strace -f -y`: the call, its first path argument
/// (from `-y`), and whether this line is where the call returned.
#[derive(Debug)]
struct Event {
    call: String,
    args: String,
    path: Option<PathBuf>,
    done: bool,
}

fn parse_strace(text: &str) -> Vec<Event> {
    let mut pending: std::collections::HashMap<String, Event> = Default::default();
    let mut out = Vec::new();
    for line in text.lines() {
        let (pid, rest) = match line.split_once(' ') {
            Some((p, r)) if p.chars().all(|c| c.is_ascii_digit()) => {
                (p.to_string(), r.trim_start())
            }
            _ => (String::new(), line),
        };
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let call = resumed.split_whitespace().next().unwrap_or("").to_string();
            let mut e = pending.remove(&pid).unwrap_or(Event {
                call,
                args: String::new(),
                path: None,
                done: true,
            });
            e.done = true;
            e.args.push_str(resumed);
            out.push(e);
            continue;
        }
        let Some((call, args)) = rest.split_once('(') else {
            continue;
        };
        // A quoted path argument, or the path `-y` prints for an fd (`12</a/b>`).
        let path = args
            .split('"')
            .nth(1)
            .filter(|p| p.starts_with('/'))
            .map(PathBuf::from)
            .or_else(|| {
                args.split_once('<')
                    .and_then(|(_, p)| p.split_once('>'))
                    .map(|(p, _)| PathBuf::from(p))
            });
        let unfinished = rest.ends_with("<unfinished ...>");
        let e = Event {
            call: call.to_string(),
            args: args.to_string(),
            path: path.clone(),
            done: !unfinished,
        };
        if unfinished {
            // The start, as its own event; the end comes with "resumed".
            out.push(Event {
                call: call.to_string(),
                args: args.to_string(),
                path: path.clone(),
                done: false,
            });
            pending.insert(pid, e);
        } else {
            // Started and returned on one line: a start and an end.
            out.push(Event {
                call: call.to_string(),
                args: args.to_string(),
                path,
                done: false,
            });
            out.push(e);
        }
    }
    out
}
