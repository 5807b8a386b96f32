//! `make bench`: relay vs direct, measured in the same run.
//!
//! For each study: DCMTK storescu → storescp directly, then storescu →
//! kakehashid → storescp, end to end (until every instance is at the
//! destination and the spool is empty). Both with TCP_NODELAY. Prints
//! instances/s, MB/s, the ratio relay/direct (time; lower is better) and
//! kakehashid's peak RSS. Each pair runs `--rounds` times; the median counts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
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
    /// Only these studies (ct, mr, mg).
    #[arg(long, value_delimiter = ',', default_value = "ct,mr,mg")]
    only: Vec<String>,
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

fn relayed(study: &Study, center: &Path, senders: usize) -> (f64, u64) {
    let scp = StoreScp::start_in(free_port(), center);
    let relay = Relay::start(RelayOptions::to(scp.port));
    let n = study.files.len();
    let t = Instant::now();
    let acked = send(relay.port, "KAKEHASHI", &study.files, senders);
    assert_eq!(acked, n, "relay send failed");
    wait_until(
        "every instance at the destination",
        Duration::from_secs(1800),
        || scp.store_requests() >= n && relay.queued() == 0,
    );
    let secs = t.elapsed().as_secs_f64();
    (secs, peak_rss(relay.pid()).unwrap_or(0))
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.data).expect("bench data dir");
    let mut studies = Vec::new();
    for name in &args.only {
        studies.push(match name.as_str() {
            "ct" => generate(
                &args.data,
                "ct",
                "CT",
                testdata::CT_IMAGE,
                300,
                512 * 1024,
                1.15,
            ),
            "mr" => generate(
                &args.data,
                "mr",
                "MR",
                testdata::MR_IMAGE,
                1200,
                128 * 1024,
                1.3,
            ),
            "mg" => generate(
                &args.data,
                "mg",
                "MG",
                testdata::MG_IMAGE,
                4,
                27 * 1024 * 1024,
                1.15,
            ),
            other => panic!("unknown study {other:?} (ct, mr, mg)"),
        });
    }
    println!(
        "kakehashi bench — {} round(s) per path, median, {} sender(s); ratio = relay time / direct time (lower is better)",
        args.rounds, args.senders
    );
    println!(
        "{:<4} {:>6} {:>9} | {:>9} {:>8} | {:>9} {:>8} | {:>6} {:>6} | {:>9}",
        "", "inst", "MB", "direct/s", "MB/s", "relay/s", "MB/s", "ratio", "target", "peak RSS"
    );
    let mut all_ok = true;
    for s in &studies {
        let mut d = Vec::new();
        let mut r = Vec::new();
        let mut rss = 0;
        for _ in 0..args.rounds {
            d.push(direct(s, &args.center_dir, args.senders));
            let (secs, peak) = relayed(s, &args.center_dir, args.senders);
            r.push(secs);
            rss = rss.max(peak);
        }
        let (d, r) = (median(d), median(r));
        let n = s.files.len() as f64;
        let mb = s.bytes as f64 / 1e6;
        let ratio = r / d;
        all_ok &= ratio <= s.target;
        println!(
            "{:<4} {:>6} {:>9.1} | {:>9.1} {:>8.1} | {:>9.1} {:>8.1} | {:>6.2} {:>6.2} | {:>6} MiB",
            s.name,
            s.files.len(),
            mb,
            n / d,
            mb / d,
            n / r,
            mb / r,
            ratio,
            s.target,
            rss >> 20
        );
    }
    println!(
        "{}",
        if all_ok {
            "all ratios within target"
        } else {
            "some ratios above target (see table)"
        }
    );
}
