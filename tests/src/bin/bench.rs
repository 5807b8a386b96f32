//! `make bench`: relay vs direct, measured in the same run.
//!
//! For each study: DCMTK storescu → storescp directly, then storescu →
//! kakehashid → storescp, end to end (until every instance is at the
//! destination and the spool is empty). Both with TCP_NODELAY. Prints
//! instances/s, MB/s, the ratio relay/direct (time; lower is better),
//! kakehashid's peak RSS, and the CPU time kakehashid spent on the study
//! beside the direct transfer's wall time (on two cores shared by storescu,
//! kakehashid and storescp, the relay's CPU is time taken from the others).
//! Each pair runs `--rounds` times, direct then relay then sealed relay;
//! a ratio is the median of each round's own ratio (the machine's speed
//! drifts over minutes, so a round compares paths run a few seconds apart),
//! and every round's ratios are printed below the table. `acked` is the
//! time until storescu had its last C-STORE-RSP (the box's reception, with
//! its flushes) over the direct time; the rest of the relay's time is the
//! store-and-forward tail.
//! The CPU floor is the CPU time storescu, kakehashid and the center's
//! storescp spent on the relayed study over (CPUs × the direct time): the
//! ratio the relay would reach if every CPU were busy all the time, which no
//! schedule on this machine can beat.
//!
//! `tunnel` (in the default set): the whole path in network namespaces
//! (see `kakehashi_systest::netns`). iperf3 through kakehashid's boringtun ↔
//! the center's wireguard-go, then through wireguard-go ↔ wireguard-go on
//! the same namespaces and keys; and the CT study relayed hospital → box →
//! tunnel → center vs storescu from the box straight to the center through
//! the same tunnel.
//!
//! `wan`: the same path with the WAN shaped as a hospital's internet line
//! (rate with `tc tbf`, round trip with the userspace impairment relay:
//! this kernel has no netem): 100 Mbit/s at 40 ms, and 20 Mbit/s at 80 ms.
//! Link capacity is iperf3 through the tunnel; for MR 1200 × 128 KiB and CT
//! 300 × 512 KiB, the relay's throughput (hospital → kakehashid, its
//! `associations` to the center) and a single storescu association from the
//! box through the same tunnel (what a plain router gives), each as a
//! fraction of iperf3's. `--associations 4,8,16` measures the relay with
//! each of those numbers of associations (the sweep the default was chosen
//! from).
//!
//! `group`: whether concurrent associations share flushes. The MR study
//! relayed with 1, 2, 4 and 8 storescu associations at once; for each, the
//! rate at which the relay acknowledged, and the flush requests the spool's
//! block device completed during the run (`/sys/dev/block/M:m/stat`, field
//! 16) per acknowledged instance. One association needs one flush per
//! instance; fewer than one per instance means flushes were shared.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use kakehashi_systest::netns::*;
use kakehashi_systest::testdata::{self, Name, Syntax};
use kakehashi_systest::*;

#[derive(Debug, Parser)]
#[command(about = "Relay vs direct benchmark (DCMTK storescu/storescp)")]
struct Args {
    /// Where generated studies are kept between runs.
    #[arg(long, default_value = ".bench")]
    data: PathBuf,
    /// Repetitions of each direct/relay pair (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the reading center (storescp) stores what it receives, for both
    /// paths. Default: the system temp dir (the box's own disk, as in the
    /// issue's setup). /dev/shm stands for a center on another machine: on
    /// one ext4 filesystem the box's journal commits also flush the center's
    /// writes.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    center_dir: PathBuf,
    /// Concurrent storescu associations per path (the study split evenly),
    /// as a PACS that sends in parallel does.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Only these parts (ct, mr, mg on loopback; group: flushes shared by
    /// concurrent associations; tunnel and wan in namespaces; backlog:
    /// start-up and status with --backlog instances queued).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ct,mr,mg,group,tunnel,wan,backlog"
    )]
    only: Vec<String>,
    /// Measure the relay on a new spool (its segment files written for the
    /// first time) instead of one in service (the study sent once through
    /// it first, unmeasured, so the segments are being used again).
    #[arg(long)]
    cold: bool,
    /// Instances queued for the backlog part.
    #[arg(long, default_value_t = 200_000)]
    backlog: usize,
    /// For the wan part: the relay's `associations` to the center, one
    /// relay leg per number (default: the daemon's default).
    #[arg(long, value_delimiter = ',')]
    associations: Vec<usize>,
}

struct Study {
    name: &'static str,
    files: Vec<PathBuf>,
    bytes: u64,
    target: f64,
}

fn generate(
    dir: &Path,
    name: &'static str,
    modality: &'static str,
    class: &'static str,
    count: usize,
    size: usize,
    target: f64,
) -> Study {
    let sub = dir.join(name);
    let marker = sub.join(".complete");
    let files = if marker.exists() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&sub)
            .expect("read bench data")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
            .collect();
        v.sort();
        v
    } else {
        let _ = std::fs::remove_dir_all(&sub);
        let v = testdata::study(
            &sub,
            name,
            modality,
            class,
            Syntax::ExplicitLe,
            Name::Utf8,
            count,
            size,
        )
        .expect("generate study");
        std::fs::write(&marker, b"").expect("marker");
        v
    };
    let bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    Study {
        name,
        files,
        bytes,
        target,
    }
}

/// CT 300 × 512 KiB (target ratio 1.3, issue 11), also the tunnel part's study.
fn ct_study(data: &Path) -> Study {
    generate(data, "ct", "CT", testdata::CT_IMAGE, 300, 512 * 1024, 1.3)
}

fn mr_study(data: &Path) -> Study {
    generate(data, "mr", "MR", testdata::MR_IMAGE, 1200, 128 * 1024, 1.3)
}

/// `1.23 1.31 1.19`.
fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Sends `files` over `senders` concurrent storescu runs; returns how many were acknowledged.
fn send(port: u16, called: &str, files: &[PathBuf], senders: usize) -> usize {
    let chunk = files.len().div_ceil(senders.max(1)).max(1);
    std::thread::scope(|scope| {
        let runs: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || storescu_to(port, "MODALITY1", called, part)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().map(|o| o.acked.len()).unwrap_or(0))
            .sum()
    })
}

fn direct(study: &Study, center: &Path, senders: usize) -> f64 {
    let scp = StoreScp::start_in(free_port(), center);
    let t = Instant::now();
    let acked = send(scp.port, "READCENTER", &study.files, senders);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(acked, study.files.len(), "direct send failed");
    secs
}

/// One relay run: seconds until every instance was acknowledged and until
/// every one was at the destination, kakehashid's peak RSS, and the flush
/// requests the spool's disk completed meanwhile (if the kernel counts them).
struct RelayRun {
    acked_secs: f64,
    secs: f64,
    peak: u64,
    flushes: Option<u64>,
    /// The spool's own count while the study was acknowledged: its
    /// `fdatasync` calls, and the instances that shared a flush another
    /// started (group commit), from its metrics endpoint.
    spool_flushes: Option<(u64, u64)>,
    /// kakehashid's CPU time (user + system) for the measured study.
    cpu: Option<f64>,
    /// kakehashid's minor page faults for the measured study.
    faults: Option<u64>,
    /// The CPU time of the peers (storescu and the destination's storescp)
    /// over the same span as `cpu`.
    peers_cpu: Option<f64>,
}

/// `kakehashi_spool_flushes_total` and
/// `kakehashi_spool_shared_flush_frames_total` from the metrics endpoint.
fn spool_flushes(metrics: u16) -> Option<(u64, u64)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let value = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()
    };
    Some((
        value("kakehashi_spool_flushes_total")?,
        value("kakehashi_spool_shared_flush_frames_total")?,
    ))
}

/// Flush requests completed by the block device holding `dir` (field 16 of
/// its `stat` in sysfs; counted since Linux 5.5).
fn device_flushes(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(dir).ok()?.dev();
    // Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    stat.split_whitespace().nth(15)?.parse().ok()
}

fn relayed(study: &Study, center: &Path, senders: usize, sealed: bool, cold: bool) -> RelayRun {
    let scp = StoreScp::start_in(free_port(), center);
    let keys = tempfile::tempdir().expect("tempdir");
    let mut opts = RelayOptions::to(scp.port);
    if sealed {
        opts = opts.with_software_keys(keys.path());
    }
    let metrics = free_port();
    opts.extra_toml += &format!("\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    let relay = Relay::start(opts);
    let n = study.files.len();
    if !cold {
        // A box in service: its spool's segments were written before.
        assert_eq!(send(relay.port, "KAKEHASHI", &study.files, senders), n);
        wait_until(
            "the warm-up study at the destination",
            Duration::from_secs(1800),
            || scp.store_requests() >= n && relay.queued() == 0,
        );
        // Emptied segments are free again after the next checkpoint (1 s).
        std::thread::sleep(Duration::from_secs(2));
    }
    let before = scp.store_requests();
    let flushes_before = device_flushes(relay.dir.path());
    let spool_before = spool_flushes(metrics);
    let cpu_before = cpu_secs(relay.pid());
    let faults_before = minor_faults(relay.pid());
    let peers_before = ended_children_cpu_secs().zip(cpu_secs(scp.pid()));
    let t = Instant::now();
    let acked = send(relay.port, "KAKEHASHI", &study.files, senders);
    let acked_secs = t.elapsed().as_secs_f64();
    let flushes = device_flushes(relay.dir.path())
        .zip(flushes_before)
        .map(|(a, b)| a - b);
    let spool_flushes = spool_flushes(metrics)
        .zip(spool_before)
        .map(|(a, b)| (a.0 - b.0, a.1 - b.1));
    assert_eq!(acked, n, "relay send failed");
    wait_until(
        "every instance at the destination",
        Duration::from_secs(1800),
        || scp.store_requests() >= before + n && relay.queued() == 0,
    );
    let secs = t.elapsed().as_secs_f64();
    let peers_cpu = ended_children_cpu_secs()
        .zip(cpu_secs(scp.pid()))
        .zip(peers_before)
        .map(|((sender, center), (sender0, center0))| sender - sender0 + center - center0);
    RelayRun {
        acked_secs,
        secs,
        peers_cpu,
        peak: peak_rss(relay.pid()).unwrap_or(0),
        flushes,
        spool_flushes,
        cpu: cpu_secs(relay.pid()).zip(cpu_before).map(|(a, b)| a - b),
        faults: minor_faults(relay.pid())
            .zip(faults_before)
            .map(|(a, b)| a - b),
    }
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.data).expect("bench data dir");
    let mut studies = Vec::new();
    for name in &args.only {
        if ["tunnel", "backlog", "wan", "group"].contains(&name.as_str()) {
            continue;
        }
        studies.push(match name.as_str() {
            "ct" => ct_study(&args.data),
            "mr" => mr_study(&args.data),
            "mg" => generate(
                &args.data,
                "mg",
                "MG",
                testdata::MG_IMAGE,
                4,
                27 * 1024 * 1024,
                1.15,
            ),
            other => panic!("unknown part {other:?} (ct, mr, mg, group, tunnel, wan, backlog)"),
        });
    }
    println!(
        "kakehashi bench — {} round(s) per path, median, {} sender(s); ratio = relay time / direct time (lower is better); {}",
        args.rounds,
        args.senders,
        if args.cold {
            "relay on a new spool (--cold)"
        } else {
            "relay on a spool in service (the study sent through it once before, unmeasured)"
        }
    );
    if !studies.is_empty() {
        print_header();
    }
    let mut all_ok = true;
    let mut per_round = Vec::new();
    for s in &studies {
        let (mut d, mut r, mut e) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rc, mut ec) = (Vec::new(), Vec::new());
        // Per round: relay, sealed, acknowledged (plain, sealed) over direct.
        let (mut rr, mut er, mut ar, mut aer) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // kakehashid's minor page faults per instance, plain and sealed.
        let per = |f: Option<u64>| f.map(|f| f as f64 / s.files.len() as f64);
        let (mut rf, mut ef) = (Vec::new(), Vec::new());
        // The least each round's relay could take on this machine's CPUs.
        let floor = |run: &RelayRun, direct: f64| {
            run.cpu
                .zip(run.peers_cpu)
                .map(|(k, p)| (k + p) / (cpus() * direct))
        };
        let (mut rfl, mut efl) = (Vec::new(), Vec::new());
        let mut rss = 0;
        for _ in 0..args.rounds {
            let direct = direct(s, &args.center_dir, args.senders);
            d.push(direct);
            let run = relayed(s, &args.center_dir, args.senders, false, args.cold);
            r.push(run.secs);
            rr.push(run.secs / direct);
            ar.push(run.acked_secs / direct);
            rf.extend(per(run.faults));
            rfl.extend(floor(&run, direct));
            rc.extend(run.cpu);
            rss = rss.max(run.peak);
            let run = relayed(s, &args.center_dir, args.senders, true, args.cold);
            e.push(run.secs);
            er.push(run.secs / direct);
            aer.push(run.acked_secs / direct);
            ef.extend(per(run.faults));
            efl.extend(floor(&run, direct));
            ec.extend(run.cpu);
            rss = rss.max(run.peak);
        }
        let rounds = format!(
            "{:<4} per round: relay {}; sealed {}; acked {}; sealed acked {}; kakehashid page faults per instance {} / sealed {}; CPU floor {} / sealed {}",
            s.name,
            list(&rr),
            list(&er),
            list(&ar),
            list(&aer),
            list(&rf),
            list(&ef),
            list(&rfl),
            list(&efl)
        );
        let (ratio, sealed) = (median(rr), median(er));
        let acked = format!("{:.2}/{:.2}", median(ar), median(aer));
        let cpu = |v: Vec<f64>| {
            if v.is_empty() {
                "?".to_string()
            } else {
                format!("{:.2}", median(v))
            }
        };
        let (rc, ec) = (cpu(rc), cpu(ec));
        let (d, r, e) = (median(d), median(r), median(e));
        let n = s.files.len() as f64;
        let mb = s.bytes as f64 / 1e6;
        all_ok &= ratio <= s.target && sealed <= s.target;
        println!(
            "{:<4} {:>6} {:>9.1} | {:>9.1} {:>8.1} | {:>9.1} {:>8.1} | {:>9.1} {:>8.1} | {:>6.2} {:>7.2} {:>6.2} {:>9} | {:>6} MiB | {:>6.2} {:>5} {:>6}",
            s.name,
            s.files.len(),
            mb,
            n / d,
            mb / d,
            n / r,
            mb / r,
            n / e,
            mb / e,
            ratio,
            sealed,
            s.target,
            acked,
            rss >> 20,
            d,
            rc,
            ec
        );
        per_round.push(rounds);
        if !rfl.is_empty() && !efl.is_empty() {
            per_round.push(format!(
                "{:<4} CPU floor {:.2} / sealed {:.2} (median): the ratio no schedule on these {} CPUs could beat",
                s.name,
                median(rfl),
                median(efl),
                cpus()
            ));
        }
    }
    for line in per_round {
        println!("{line}");
    }
    if !studies.is_empty() {
        println!(
            "{}",
            if all_ok {
                "all ratios within target"
            } else {
                "some ratios above target (see table)"
            }
        );
    }
    if args.only.iter().any(|o| o == "group") {
        group_bench(&mr_study(&args.data), &args.center_dir, args.rounds);
    }
    if args.only.iter().any(|o| o == "tunnel") {
        tunnel_bench(&ct_study(&args.data), args.rounds);
    }
    if args.only.iter().any(|o| o == "wan") {
        wan_bench(
            &[mr_study(&args.data), ct_study(&args.data)],
            &args.associations,
        );
    }
    if args.only.iter().any(|o| o == "backlog") {
        backlog_bench(&args.data, args.backlog);
    }
}

/// CPUs this process may run on.
fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, usize::from) as f64
}

fn print_header() {
    println!(
        "sealed = the spool sealed (chunked ChaCha20-Poly1305, as on a provisioned box; software keys here, the data path is the same)"
    );
    println!(
        "CPU s = kakehashid's CPU time (user + system) for the study, plain and sealed, beside the direct transfer's wall time"
    );
    println!(
        "ratios: median of each round's relay / direct; acked = until the sender's last C-STORE-RSP / direct (plain/sealed): the box's reception; the rest is the store-and-forward tail"
    );
    println!(
        "CPU floor = the CPU time storescu, kakehashid and the destination's storescp spent on the relayed study, over (CPUs × the direct time): the relay's ratio if every CPU were busy all the time"
    );
    println!(
        "{:<4} {:>6} {:>9} | {:>9} {:>8} | {:>9} {:>8} | {:>9} {:>8} | {:>6} {:>7} {:>6} {:>9} | {:>9} | {:>6} {:>5} {:>6}",
        "",
        "inst",
        "MB",
        "direct/s",
        "MB/s",
        "relay/s",
        "MB/s",
        "sealed/s",
        "MB/s",
        "ratio",
        "sealed",
        "target",
        "acked",
        "peak RSS",
        "direct",
        "CPU s",
        "sealed"
    );
}

/// Whether concurrent associations share flushes: the MR study relayed with
/// 1, 2, 4 and 8 senders; acknowledgement rate, end-to-end rate against
/// direct with as many senders, and device flushes per acknowledged
/// instance (medians of `rounds`).
fn group_bench(study: &Study, center: &Path, rounds: usize) {
    let n = study.files.len() as f64;
    println!(
        "group commit: {} relayed by N concurrent storescu associations (spool in service); device = flush requests completed by the spool's disk while the study was acknowledged; fdatasync = the spool's own flushes; shared = instances acknowledged after a flush another started",
        study.name
    );
    println!(
        "{:>7} | {:>9} {:>9} {:>9} | {:>6} | {:>12} {:>15} {:>7}",
        "senders",
        "direct/s",
        "acked/s",
        "relay/s",
        "ratio",
        "device/inst",
        "fdatasync/inst",
        "shared"
    );
    for senders in [1, 2, 4, 8] {
        let (mut d, mut a, mut r, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut own, mut shared) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            d.push(direct(study, center, senders));
            let run = relayed(study, center, senders, false, false);
            a.push(run.acked_secs);
            r.push(run.secs);
            if let Some(flushes) = run.flushes {
                f.push(flushes as f64 / n);
            }
            if let Some((flushes, joined)) = run.spool_flushes {
                own.push(flushes as f64 / n);
                shared.push(joined as f64 / n);
            }
        }
        let (d, a, r) = (median(d), median(a), median(r));
        let flushes = if f.is_empty() {
            "not counted".to_string()
        } else {
            format!("{:.2}", median(f))
        };
        let (own, shared) = if own.is_empty() {
            ("?".to_string(), "?".to_string())
        } else {
            (
                format!("{:.2}", median(own)),
                format!("{:.0} %", 100.0 * median(shared)),
            )
        };
        println!(
            "{senders:>7} | {:>9.1} {:>9.1} {:>9.1} | {:>6.2} | {flushes:>12} {own:>15} {shared:>7}",
            n / d,
            n / a,
            n / r,
            r / d
        );
    }
}

/// A week's outage at a busy site: `n` small instances queued for a
/// destination that does not answer. How long kakehashid takes to start on
/// that spool (kill -9, start, serving), and how long `status` takes.
fn backlog_bench(data: &Path, n: usize) {
    const SENDERS: usize = 4;
    let dir = data.join(format!("backlog-{n}"));
    let marker = dir.join(".complete");
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let per = n.div_ceil(SENDERS);
        for i in 0..SENDERS {
            let count = per.min(n - i * per);
            testdata::study(
                &dir.join(format!("s{i}")),
                &format!("backlog{i}"),
                "CT",
                testdata::CT_IMAGE,
                Syntax::ExplicitLe,
                Name::Ascii,
                count,
                1024,
            )
            .expect("generate backlog");
        }
        std::fs::write(&marker, b"").expect("marker");
    }
    // Nothing listens on the destination's port: everything stays queued.
    let mut relay = Relay::start(RelayOptions::to(free_port()));
    let t = Instant::now();
    std::thread::scope(|scope| {
        for i in 0..SENDERS {
            let sub = dir.join(format!("s{i}"));
            let port = relay.port;
            scope.spawn(move || {
                std::process::Command::new("storescu")
                    .args([
                        "-nh",
                        "-R",
                        "-xe",
                        "+sd",
                        "-aet",
                        "MODALITY1",
                        "-aec",
                        "KAKEHASHI",
                        "127.0.0.1",
                    ])
                    .arg(port.to_string())
                    .arg(&sub)
                    .env("TCP_NODELAY", "1")
                    .output()
                    .expect("storescu")
            });
        }
    });
    let ingest = t.elapsed();
    let queued = relay.queued();
    let status_ms = |relay: &Relay| {
        let mut v: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                let _ = relay.status();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let before = status_ms(&relay);
    relay.kill9();
    let t = Instant::now();
    relay.restart();
    let startup = t.elapsed();
    let after = status_ms(&relay);
    let cli = {
        let t = Instant::now();
        let out = relay.cli(&["status"]);
        assert!(out.status.success());
        t.elapsed()
    };
    println!(
        "backlog: {queued} queued (sent {n} in {:.0} s, {:.0}/s with {SENDERS} senders); start-up after kill -9: {:.2} s; status: {:.2} ms (control socket, median of 20; {:.2} ms after the restart); `kakehashi status` {:.0} ms",
        ingest.as_secs_f64(),
        n as f64 / ingest.as_secs_f64(),
        startup.as_secs_f64(),
        before,
        after,
        cli.as_secs_f64() * 1e3
    );
    assert_eq!(queued as usize, n, "every instance queued");
}

const CENTER_DICOM_PORT: u16 = 11113;
const IPERF_PORT: u16 = 5201;

/// iperf3 from the box namespace to the center's tunnel address; bits/s.
fn iperf(site: &Site, seconds: u32) -> f64 {
    let _server = Proc(
        ns_command(Some(site.center.name()), "iperf3")
            .args(["-s", "-B", CENTER_TUNNEL_IP, "-p", &IPERF_PORT.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)"),
    );
    wait_port_in(
        site.center.name(),
        &format!("{CENTER_TUNNEL_IP}:{IPERF_PORT}"),
        "iperf3 -s",
    );
    let out = run(ns_command(Some(site.boxns.name()), "iperf3").args([
        "-c",
        CENTER_TUNNEL_IP,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 gave no throughput: {out}"))
}

/// The box's end as wireguard-go + wg, on the same interface name and key.
fn box_wireguard_go(site: &Site) -> Proc {
    let b = site.boxns.name();
    let iface = &site.box_interface;
    let sock = format!("/var/run/wireguard/{iface}.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Proc(
        ns_command(Some(b), "wireguard-go")
            .args(["-f", iface])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("wireguard-go"),
    );
    wait_until("wireguard-go on the box", Duration::from_secs(10), || {
        Path::new(&sock).exists()
    });
    run(ns_command(Some(b), "wg").args([
        "set",
        iface,
        "private-key",
        &site.box_key.display().to_string(),
        "peer",
        &site.center_public,
        "endpoint",
        &format!("{}:{WG_PORT}", site.center_wan_ip),
        "allowed-ips",
        "10.8.0.0/24",
        "persistent-keepalive",
        "25",
    ]));
    run(ns_command(None, "ip").args([
        "-n",
        b,
        "addr",
        "add",
        &format!("{BOX_TUNNEL_IP}/24"),
        "dev",
        iface,
    ]));
    run(ns_command(None, "ip").args(["-n", b, "link", "set", iface, "mtu", "1420", "up"]));
    child
}

/// Seconds from the hospital's first C-STORE to the box until `files`
/// are all at the center and the spool is empty.
fn relay_through(site: &Site, relay: &Relay, scp: &StoreScp, files: &[PathBuf]) -> f64 {
    let n = files.len();
    let t = Instant::now();
    let out = send_from_hospital(site, relay, files);
    if out.acked.len() != n {
        let log = relay.log_text();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let said: Vec<&str> = out
            .output
            .lines()
            .filter(|l| l.contains("E:") || l.contains("W:"))
            .take(20)
            .collect();
        panic!(
            "the relay acknowledged {} of {n}; storescu said:\n{}\nkakehashid's log ends:\n{}",
            out.acked.len(),
            said.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    wait_until(
        "every instance at the center",
        Duration::from_secs(3600),
        || scp.store_requests() >= n && relay.queued() == 0,
    );
    t.elapsed().as_secs_f64()
}

/// kakehashid in the box namespace, forwarding to the center through its
/// tunnel, once the tunnel is up.
fn tunnel_relay(site: &Site, associations: Option<usize>) -> Relay {
    let mut opts = RelayOptions::to(CENTER_DICOM_PORT);
    opts.associations = associations;
    opts.netns = Some(site.boxns.name().to_string());
    opts.listen_host = BOX_LAN_IP.into();
    opts.dest_host = CENTER_TUNNEL_IP.into();
    opts.extra_toml = site.tunnel_toml(&site.center_public, "150s");
    let relay = Relay::start(opts);
    wait_until("the tunnel to come up", Duration::from_secs(60), || {
        relay.status().tunnel.is_some_and(|t| t.up)
    });
    relay
}

fn tunnel_bench(ct: &Study, rounds: usize) {
    println!();
    println!("tunnel — hospital → box → WireGuard → center, in network namespaces; {rounds} round(s), median");
    let site = Site::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let scp_base = dir.path().to_path_buf();
    let mut relay = tunnel_relay(&site, None);
    let n = ct.files.len();
    let (mut direct, mut relayed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let scp = StoreScp::start_ns(CENTER_DICOM_PORT, &scp_base, Some(site.center.name()));
        let t = Instant::now();
        let out = storescu_at(
            Some(site.boxns.name()),
            CENTER_TUNNEL_IP,
            CENTER_DICOM_PORT,
            "KAKEHASHI",
            "READCENTER",
            &ct.files,
        );
        assert_eq!(out.acked.len(), n, "direct through the tunnel failed");
        direct.push(t.elapsed().as_secs_f64());
        drop(scp);

        let scp = StoreScp::start_ns(CENTER_DICOM_PORT, &scp_base, Some(site.center.name()));
        relayed.push(relay_through(&site, &relay, &scp, &ct.files));
    }
    let (d, r) = (median(direct), median(relayed));
    let mb = ct.bytes as f64 / 1e6;
    println!(
        "CT {n}×512 KiB through the tunnel: direct (storescu box → center) {:.1} inst/s {:.1} MB/s | relay (hospital → kakehashid → center) {:.1} inst/s {:.1} MB/s | relay/direct throughput {:.2} (target ≥ 0.90)",
        n as f64 / d,
        mb / d,
        n as f64 / r,
        mb / r,
        d / r
    );

    let mut boring = Vec::new();
    for _ in 0..rounds {
        boring.push(iperf(&site, 8));
    }
    let _ = relay.terminate();
    let _wg = box_wireguard_go(&site);
    wait_until("a wireguard-go handshake", Duration::from_secs(30), || {
        ns_command(Some(site.boxns.name()), "ping")
            .args(["-c", "1", "-W", "1", CENTER_TUNNEL_IP])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let mut wggo = Vec::new();
    for _ in 0..rounds {
        wggo.push(iperf(&site, 8));
    }
    let (b, g) = (median(boring), median(wggo));
    println!(
        "iperf3 TCP box → center, 8 s: boringtun (kakehashid) ↔ wireguard-go {:.0} Mbit/s | wireguard-go ↔ wireguard-go {:.0} Mbit/s | boringtun/wireguard-go {:.2} (target ≥ 0.90)",
        b / 1e6,
        g / 1e6,
        b / g
    );
}

/// Each shaped link: `rate` for `tc tbf`, `one_way` delay each direction;
/// the relay with each of `counts` associations (the default when empty).
fn wan_bench(studies: &[Study], counts: &[usize]) {
    println!();
    println!("wan — hospital → box → WireGuard over a shaped WAN → center (storescp --fork); one round each; throughput / iperf3 through the same tunnel (target: relay ≥ 0.80)");
    let counts: Vec<Option<usize>> = if counts.is_empty() {
        vec![None]
    } else {
        counts.iter().copied().map(Some).collect()
    };
    for (rate, one_way) in [("100mbit", 20u64), ("20mbit", 40)] {
        let mut site = Site::new();
        site.impair(0.0, Duration::from_millis(one_way));
        site.limit_rate(rate);
        let dir = tempfile::tempdir().expect("tempdir");
        let scp_base = dir.path().to_path_buf();
        let mut relay = tunnel_relay(&site, None);
        let link = iperf(&site, 10);
        println!(
            "{rate} at {} ms RTT: iperf3 {:.1} Mbit/s",
            2 * one_way,
            link / 1e6
        );
        // The relay's associations linger after its last instance, in
        // children of the forking storescp: a port of their own for each leg.
        let center = |port| {
            StoreScp::start_with(
                port,
                &scp_base,
                Some(site.center.name()),
                "READCENTER",
                &["--fork"],
            )
        };
        let mut singles = Vec::new();
        for study in studies {
            let scp = center(CENTER_DICOM_PORT + 1);
            let t = Instant::now();
            let out = storescu_at(
                Some(site.boxns.name()),
                CENTER_TUNNEL_IP,
                CENTER_DICOM_PORT + 1,
                "KAKEHASHI",
                "READCENTER",
                &study.files,
            );
            assert_eq!(
                out.acked.len(),
                study.files.len(),
                "storescu through the tunnel failed"
            );
            singles.push(study.bytes as f64 * 8.0 / t.elapsed().as_secs_f64());
            drop(scp);
        }
        for count in &counts {
            if count.is_some() {
                let _ = relay.terminate();
                relay = tunnel_relay(&site, *count);
            }
            let associations = relay.status().destinations[0].associations_max;
            for (study, single) in studies.iter().zip(&singles) {
                let n = study.files.len();
                let scp = center(CENTER_DICOM_PORT);
                let relayed =
                    study.bytes as f64 * 8.0 / relay_through(&site, &relay, &scp, &study.files);
                drop(scp);
                println!(
                    "  {:<3} {n:>5} × {:>3} KiB: relay ({associations:>2} associations) {:>6.1} Mbit/s = {:.2} × iperf3 | one storescu association {:>6.1} Mbit/s = {:.2} × iperf3 | relay / one association {:.1}",
                    study.name,
                    study.bytes / n as u64 / 1024,
                    relayed / 1e6,
                    relayed / link,
                    single / 1e6,
                    single / link,
                    relayed / single
                );
            }
        }
        let _ = relay.terminate();
    }
}
