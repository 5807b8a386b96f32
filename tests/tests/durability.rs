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

/// Sealed: streamed, authenticated chunk by chunk as it is sent; memory stays small.
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

/// Datasets that leave together are not all held in memory. A dataset of
/// at most 4 MiB (`forwarder::HELD_MAX`) is checked into memory and sent
/// from there only within one budget shared by all associations of all
/// destinations (32 MiB); the others are streamed. Two destinations with 16
/// associations each, each getting the same sixteen datasets of just under
/// 4 MiB queued while it was down:
/// - centers serving one association at a time: one is held per center at
///   a time (about 20 MiB peak).
/// - centers serving each association in a process of its own (as a PACS
///   does): the 32 are in flight at once. With the budget about 51 MiB;
///   without it every association holds its own (77–79 MiB measured).
///
/// (When mammograms were held, this test also caught the allocator's
/// arenas keeping each one after it was freed: 136 MiB without the fixed
/// mmap threshold. Held datasets are now at most 4 MiB and that no longer
/// shows here; the threshold is proven by
/// `memory_freed_after_an_instance_serves_the_next`.)
#[test]
fn large_instances_leaving_together_stay_within_one_memory_budget() {
    const SIZE: usize = 4 * 1024 * 1024 - 64 * 1024;
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let ports = [free_port(), free_port()];
    let mut opts = RelayOptions::to(ports[0]).with_software_keys(keys.path());
    opts.destinations
        .push(("second-center".into(), "READCENTER".into(), ports[1]));
    opts.associations = Some(16);
    let relay = Relay::start(opts);
    let by_uid = |paths: &[PathBuf]| {
        let mut v: Vec<(String, Option<Vec<u8>>)> = paths
            .iter()
            .map(|p| {
                let b = read(p);
                (uid(p), testdata::dataset_of_file(&b).map(<[u8]>::to_vec))
            })
            .collect();
        v.sort();
        v
    };
    // The one-at-a-time centers first: a forking one's children would keep
    // the port for a while after it stops.
    for (study, forking) in [("screening", false), ("follow-up", true)] {
        let files = testdata::study(
            data.path(),
            study,
            "MG",
            testdata::MG_IMAGE,
            Syntax::ExplicitLe,
            Name::Utf8,
            16,
            SIZE,
        )
        .expect("data");
        let out = storescu(relay.port, "MODALITY1", &files);
        assert_eq!(out.acked.len(), files.len(), "{}", out.output);
        let extra: &[&str] = if forking { &["--fork"] } else { &[] };
        let centers = ports.map(|port| {
            StoreScp::start_with(port, &std::env::temp_dir(), None, "READCENTER", extra)
        });
        relay.wait_drained(Duration::from_secs(300));
        for center in &centers {
            assert!(by_uid(&center.files()) == by_uid(&files), "byte-identical");
        }
        let peak = peak_rss(relay.pid()).expect("VmHWM");
        println!(
            "16 instances of {:.1} MiB relayed to two centers {}; kakehashid peak RSS so far {} MiB",
            SIZE as f64 / (1 << 20) as f64,
            if forking {
                "serving them all at once"
            } else {
                "serving one association at a time"
            },
            peak >> 20
        );
        assert!(
            peak < 64 * 1024 * 1024,
            "peak RSS {} MiB: more than the 32 MiB budget of datasets held in memory\n{}",
            peak >> 20,
            relay.log_text()
        );
    }
}

/// Memory freed after one instance serves the next: the allocator does not
/// give it back to the kernel and fault it in again per instance (with
/// glibc's trim threshold at its 128 KiB default, a 512 KiB instance cost
/// kakehashid about 195 page faults in and out, 12–16 % of its CPU; with
/// the trim threshold fixed but not the mmap threshold, which then stays
/// at 128 KiB and maps every larger block anew, 257). Counts,
/// not time: the minor page faults kakehashid takes for a study, relayed
/// sealed through a spool in service, per instance.
#[test]
fn memory_freed_after_an_instance_serves_the_next() {
    let keys = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port).with_software_keys(keys.path()));
    let warm = testdata::ct_study(data.path(), "warm", 40, 512 * 1024);
    let files = testdata::ct_study(data.path(), "measured", 100, 512 * 1024);
    assert_eq!(storescu(relay.port, "MODALITY1", &warm).acked.len(), 40);
    relay.wait_drained(Duration::from_secs(120));
    let before = minor_faults(relay.pid()).expect("minflt");
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(out.acked.len(), files.len(), "{}", out.output);
    relay.wait_drained(Duration::from_secs(120));
    let per = (minor_faults(relay.pid()).expect("minflt") - before) as f64 / files.len() as f64;
    println!("kakehashid: {per:.1} minor page faults per 512 KiB instance relayed");
    // A 512 KiB instance is 128 pages; taking them again for each one is the defect.
    assert!(per < 32.0, "{per:.1} page faults per instance");
}

/// What an acknowledgement relies on: before the C-STORE-RSP leaves, the
/// frame holding the instance (payload, log entry, then its header) was
/// flushed with `fdatasync` after its header was written. kill -9 cannot
/// catch a missing flush (the page cache survives it), so the order of the
/// syscalls is read with strace; the image's power-cut test proves the same
/// end to end. The instances are 512 KiB: each one's write-out is started
/// early while it arrives, which must count for nothing.
#[test]
fn a_frame_is_flushed_before_its_instance_is_acknowledged() {
    const SENDERS: usize = 6;
    const PER_SENDER: usize = 6;
    let data = tempfile::tempdir().expect("tempdir");
    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    // A box in service: a study went through, so its segments are used
    // again from their start, below their written-through marks, where
    // frames share flushes (group commit).
    let warm = ct_study(
        &data.path().join("warm"),
        "warm",
        SENDERS * PER_SENDER,
        512 * 1024,
    );
    let acked = send_concurrently(relay.port, &warm, SENDERS);
    assert_eq!(acked, warm.len());
    wait_until(
        "the first study at the center",
        Duration::from_secs(120),
        || center.store_requests() >= warm.len() && relay.queued() == 0,
    );
    // Emptied segments are free again after the next checkpoint (1 s).
    std::thread::sleep(Duration::from_secs(2));

    let files = ct_study(
        &data.path().join("order"),
        "order",
        SENDERS * PER_SENDER,
        512 * 1024,
    );
    let trace = data.path().join("strace.txt");
    let strace = Proc(
        std::process::Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-yy",
                "-s",
                "4096",
                "-e",
                "trace=pwrite64,sync_file_range,fdatasync,fsync,sendto,write,writev",
                // Each flush takes 20 ms more, as on a slow disk: frames
                // written out meanwhile pile up behind it and share the
                // next one, the case a wrong rule would get wrong.
                "-e",
                "inject=fdatasync:delay_enter=20000",
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
    assert_eq!(send_concurrently(relay.port, &files, SENDERS), files.len());
    std::thread::sleep(Duration::from_millis(300));
    drop(strace);
    let text = std::fs::read_to_string(&trace).expect("trace");
    let uids: Vec<String> = files.iter().map(|f| uid(f)).collect();
    let segments = relay
        .spool_dir()
        .canonicalize()
        .expect("spool dir")
        .join("seg");
    let checked = check_flushed_before_acknowledged(&text, &segments, relay.port, &uids)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    eprintln!("{checked:?}");
    assert!(
        checked.shared_path > 0 && checked.by_another_file > 0,
        "no frame was made durable by another segment's flush: the test did not reach group commit\n{text}"
    );
    assert!(
        checked.early >= files.len(),
        "fewer early write-outs than instances: the test did not reach them\n{text}"
    );
}

/// Sends `files` over `senders` concurrent storescu associations; the
/// number acknowledged.
fn send_concurrently(port: u16, files: &[PathBuf], senders: usize) -> usize {
    std::thread::scope(|scope| {
        let runs: Vec<_> = files
            .chunks(files.len().div_ceil(senders))
            .map(|part| scope.spawn(move || storescu(port, "MODALITY1", part)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().map(|o| o.acked.len()).unwrap_or(0))
            .sum()
    })
}

/// What [`check_flushed_before_acknowledged`] saw.
#[derive(Debug, Default)]
struct FlushCheck {
    /// C-STORE-RSPs checked.
    responses: usize,
    /// Frames written out (`sync_file_range`) for a shared flush.
    shared_path: usize,
    /// Frames made durable by an `fdatasync` of another segment.
    by_another_file: usize,
    /// `fdatasync` calls on segments.
    flushes: usize,
    /// Write-outs started early, while a payload arrived: they make
    /// nothing durable and count for no frame.
    early: usize,
}

/// A frame seen in the trace: its segment, its header's offset, the SOP
/// Instance UID its log entry names, and how far it got.
#[derive(Debug)]
struct SeenFrame {
    path: PathBuf,
    at: u64,
    uid: String,
    written_out: bool,
    flushed: bool,
}

/// Reads a `strace -f -yy -s 4096` trace of kakehashid receiving the
/// instances `uids` on `port` and checks, for each, that its C-STORE-RSP
/// left only after its frame was durable: flushed by an `fdatasync` of its
/// own segment that began after its header was written, or written out by
/// `sync_file_range` and then covered by an `fdatasync` of any segment that
/// *began* after that writeout returned (a flush begun before covers
/// nothing written after).
fn check_flushed_before_acknowledged(
    text: &str,
    segments: &std::path::Path,
    port: u16,
    uids: &[String],
) -> Result<FlushCheck, String> {
    let mut frames: Vec<SeenFrame> = Vec::new();
    // Per thread: the UID of the log entry it wrote last, and the frames a
    // flush it began will cover.
    let mut body_uid: std::collections::HashMap<String, String> = Default::default();
    let mut flushing: std::collections::HashMap<String, Vec<usize>> = Default::default();
    let mut out = FlushCheck::default();
    let mut answered: HashSet<String> = HashSet::new();
    // `-yy` names a socket `TCP:[local->peer]`; the parser cuts at the first
    // `>`, so the local end and the `-` remain.
    let inbound = format!(":{port}-");
    // The arguments of a call, without what strace adds after them.
    let arg_list = |args: &str| -> Vec<String> {
        let args = args.trim_end().trim_end_matches("(DELAYED)");
        let end = args
            .find(" <unfinished")
            .or_else(|| args.rfind(')'))
            .unwrap_or(args.len());
        args[..end]
            .split(", ")
            .map(|a| a.trim().to_string())
            .collect()
    };
    let last_num = |args: &str| -> Option<u64> { arg_list(args).last()?.parse().ok() };
    for e in parse_strace(text) {
        let pid = e.pid.clone();
        let on_segment = e.path.as_ref().is_some_and(|p| p.starts_with(segments));
        match (e.call.as_str(), e.done, on_segment) {
            ("pwrite64", true, true) => {
                // A log entry, JSON as strace quotes it.
                if let Some(u) = e.args.split(r#"\"sop_instance_uid\":\""#).nth(1) {
                    let u = u.split('\\').next().unwrap_or_default().to_string();
                    body_uid.insert(pid.clone(), u);
                } else if e.args.contains(", 512, ") && e.args.contains("\"KKSG") {
                    let uid = body_uid
                        .remove(&pid)
                        .ok_or("a frame header with no log entry before it")?;
                    let at = last_num(&e.args).ok_or("pwrite64 offset")?;
                    frames.push(SeenFrame {
                        path: e.path.clone().expect("path"),
                        at,
                        uid,
                        written_out: false,
                        flushed: false,
                    });
                }
            }
            ("sync_file_range", true, true) => {
                // sync_file_range(fd, offset, nbytes, flags)
                let nums: Vec<u64> = arg_list(&e.args)
                    .iter()
                    .skip(1)
                    .take(2)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                let [off, len] = nums[..] else {
                    return Err(format!("sync_file_range arguments: {}", e.args));
                };
                if !e.args.contains("SYNC_FILE_RANGE_WRITE") {
                    return Err(format!("a writeout that writes nothing: {}", e.args));
                }
                if !e.args.contains("WAIT_AFTER") {
                    // Started early, while the payload arrived (no wait):
                    // covers nothing.
                    out.early += 1;
                    continue;
                }
                for f in frames
                    .iter_mut()
                    .filter(|f| Some(&f.path) == e.path.as_ref())
                {
                    if f.at >= off && f.at < off + len {
                        f.written_out = true;
                        out.shared_path += 1;
                    }
                }
            }
            ("fdatasync" | "fsync", false, true) => {
                // Begins: covers frames written out by now, and the frames of
                // its own file written by now.
                let covered = frames
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| {
                        !f.flushed && (f.written_out || Some(&f.path) == e.path.as_ref())
                    })
                    .map(|(i, _)| i)
                    .collect();
                flushing.insert(pid.clone(), covered);
            }
            ("fdatasync" | "fsync", true, true) => {
                out.flushes += 1;
                let covered = flushing.remove(&pid).unwrap_or_default();
                // `) = 0` (strace may pad before the `=`), perhaps followed
                // by ` (DELAYED)`.
                let ok = e
                    .args
                    .rsplit_once(" = ")
                    .is_some_and(|(_, r)| r.split_whitespace().next() == Some("0"));
                if ok {
                    for i in covered {
                        if Some(&frames[i].path) != e.path.as_ref() {
                            out.by_another_file += 1;
                        }
                        frames[i].flushed = true;
                    }
                }
            }
            ("sendto" | "write" | "writev", true, false)
                if e.path
                    .as_ref()
                    .is_some_and(|p| p.to_string_lossy().contains(&inbound)) =>
            {
                // A PDU to a sender: if it names an instance (its
                // C-STORE-RSP), that instance's frame must be durable.
                let Some(u) = uids
                    .iter()
                    .filter(|u| e.args.contains(u.as_str()))
                    .max_by_key(|u| u.len())
                else {
                    continue;
                };
                let Some(f) = frames.iter().rev().find(|f| &f.uid == u) else {
                    return Err(format!(
                        "the response for {u} left before its frame was written"
                    ));
                };
                if !f.flushed {
                    return Err(format!(
                        "the response for {u} left while its frame ({} at {}) was not durable{}: a power cut then loses an acknowledged instance",
                        f.path.display(),
                        f.at,
                        if f.written_out { " (written out, but no flush began after that)" } else { "" }
                    ));
                }
                answered.insert(u.clone());
                out.responses += 1;
            }
            _ => {}
        }
    }
    if answered.len() != uids.len() {
        return Err(format!(
            "responses seen for {} of {} instances",
            answered.len(),
            uids.len()
        ));
    }
    Ok(out)
}

/// One syscall line of `strace -f -y`: the call, its first path argument
/// (from `-y`), and whether this line is where the call returned.
#[derive(Debug)]
struct Event {
    /// The thread (strace -f prefixes its id).
    pid: String,
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
                pid: pid.clone(),
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
            pid: pid.clone(),
            call: call.to_string(),
            args: args.to_string(),
            path: path.clone(),
            done: !unfinished,
        };
        if unfinished {
            // The start, as its own event; the end comes with "resumed".
            out.push(Event {
                pid: pid.clone(),
                call: call.to_string(),
                args: args.to_string(),
                path: path.clone(),
                done: false,
            });
            pending.insert(pid, e);
        } else {
            // Started and returned on one line: a start and an end.
            out.push(Event {
                pid: pid.clone(),
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
