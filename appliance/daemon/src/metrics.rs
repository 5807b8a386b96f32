//! The Prometheus text endpoint (`[metrics] listen`, off without it): `GET
//! /metrics` and nothing else, on the hospital side only (the config
//! refuses the tunnel's and the WAN's addresses; on the appliance the
//! firewall opens the port on the LAN port only).
//!
//! No HTTP library: one request per connection, a request head of at most
//! 8 KiB read within 10 s, at most 8 connections at once, `Connection:
//! close`. Everything shown comes from counters the daemon keeps anyway
//! (the forwarders' queues and stats, the tunnel's health, the spool's
//! accounting): a scrape costs O(destinations), whatever the backlog.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kakehashi_spool::Priority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Upper bounds (seconds) of the C-STORE latency buckets: a LAN answers
/// in milliseconds, a large instance over a hospital line takes minutes.
const BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const MAX_HEAD: usize = 8 * 1024;
const READ_WITHIN: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 8;

/// A latency histogram (counts per bucket, not yet cumulative).
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    over: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        self.sum += s;
        match BUCKETS.iter().position(|b| s <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.over
    }
}

/// One destination as a scrape shows it (see `forwarder::Handle::metrics`).
#[derive(Debug)]
pub struct Destination {
    pub name: String,
    pub lanes: [(Priority, u64, u64); 3],
    pub oldest_age_s: Option<f64>,
    pub delivered: u64,
    pub delivered_bytes: u64,
    pub latency: Histogram,
    pub associations_open: u64,
    pub associations_allowed: u64,
    pub in_flight: u64,
    pub connect_failures: u64,
}

/// Serves scrapes until `token` is cancelled.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, token: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = token.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over the limit the connection is just closed: a scraper retries.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(e) = answer(&shared, stream).await {
                tracing::debug!(%peer, "metrics: {e}");
            }
            drop(slot);
        });
    }
}

async fn answer(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_WITHIN, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            return reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                "request head over 8 KiB\n",
            )
            .await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(shared);
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            reply(
                &mut stream,
                "200 OK",
                "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n",
                &body,
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            reply(
                &mut stream,
                "404 Not Found",
                "",
                "only /metrics is served here\n",
            )
            .await
        }
        _ => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "only GET /metrics is served here\n",
            )
            .await
        }
    }
}

/// The request head up to the blank line; `None` when it is too long.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// One family with a sample per destination.
    fn per_destination<T: std::fmt::Display>(
        &mut self,
        dests: &[Destination],
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&Destination) -> T,
    ) {
        self.family(name, kind, help);
        for d in dests {
            self.sample(
                name,
                &format!("destination=\"{}\"", label(&d.name)),
                value(d),
            );
        }
    }
}

fn lane(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Medium => "medium",
        Priority::Low => "low",
    }
}

/// The whole exposition, in Prometheus text format 0.0.4.
pub fn render(shared: &Shared) -> String {
    let dests: Vec<Destination> = shared.forwarders.iter().map(|f| f.metrics()).collect();
    let mut t = Text(String::with_capacity(4096));
    t.family(
        "kakehashi_build_info",
        "gauge",
        "The running kakehashid's version.",
    );
    t.sample(
        "kakehashi_build_info",
        &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );
    t.family(
        "kakehashi_uptime_seconds",
        "gauge",
        "Seconds since kakehashid started.",
    );
    t.sample(
        "kakehashi_uptime_seconds",
        "",
        shared.started.elapsed().as_secs(),
    );
    t.family(
        "kakehashi_received_instances_total",
        "counter",
        "Instances accepted into the spool since the start (duplicates not counted).",
    );
    t.sample(
        "kakehashi_received_instances_total",
        "",
        shared.received.load(Ordering::Relaxed),
    );
    t.family(
        "kakehashi_received_bytes_total",
        "counter",
        "Dataset bytes accepted into the spool since the start.",
    );
    t.sample(
        "kakehashi_received_bytes_total",
        "",
        shared.received_bytes.load(Ordering::Relaxed),
    );
    t.family(
        "kakehashi_inbound_associations",
        "gauge",
        "Associations from the hospital (and the center's results) open now.",
    );
    t.sample(
        "kakehashi_inbound_associations",
        "",
        shared.active_associations.load(Ordering::SeqCst),
    );
    let spool = &shared.spool;
    for (name, help, v) in [
        (
            "kakehashi_spool_used_bytes",
            "Spool usage (segments, payload files, index).",
            spool.used_bytes(),
        ),
        (
            "kakehashi_spool_payload_bytes",
            "Payload bytes the spool holds.",
            spool.payload_bytes(),
        ),
        (
            "kakehashi_spool_max_bytes",
            "spool.max_size.",
            spool.limits().max_size,
        ),
        (
            "kakehashi_spool_free_bytes",
            "Free bytes on the spool's filesystem.",
            spool.free_bytes().unwrap_or(0),
        ),
    ] {
        t.family(name, "gauge", help);
        t.sample(name, "", v);
    }
    let (flushes, shared_frames) = spool.flush_counts();
    for (name, help, v) in [
        (
            "kakehashi_spool_flushes_total",
            "fdatasync calls made to acknowledge instances (group commit shares one among concurrent frames).",
            flushes,
        ),
        (
            "kakehashi_spool_shared_flush_frames_total",
            "Instances acknowledged after a flush another instance started.",
            shared_frames,
        ),
    ] {
        t.family(name, "counter", help);
        t.sample(name, "", v);
    }

    for (name, help, bytes) in [
        (
            "kakehashi_queue_instances",
            "Instances waiting for the destination (those on the wire included), per priority lane.",
            false,
        ),
        (
            "kakehashi_queue_bytes",
            "Dataset bytes waiting for the destination, per priority lane.",
            true,
        ),
    ] {
        t.family(name, "gauge", help);
        for d in &dests {
            for (p, n, b) in d.lanes {
                let labels = format!("destination=\"{}\",lane=\"{}\"", label(&d.name), lane(p));
                t.sample(name, &labels, if bytes { b } else { n });
            }
        }
    }
    t.per_destination(
        &dests,
        "kakehashi_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest instance waiting (0 when none waits).",
        |d| d.oldest_age_s.unwrap_or(0.0),
    );
    t.family(
        "kakehashi_dead_letters",
        "gauge",
        "Instances the destination refused for good, kept until an operator acts.",
    );
    for d in &dests {
        t.sample(
            "kakehashi_dead_letters",
            &format!("destination=\"{}\"", label(&d.name)),
            spool.dead_letters(&d.name),
        );
    }
    t.per_destination(
        &dests,
        "kakehashi_delivered_instances_total",
        "counter",
        "Instances the destination acknowledged since the start.",
        |d| d.delivered,
    );
    t.per_destination(
        &dests,
        "kakehashi_delivered_bytes_total",
        "counter",
        "Dataset bytes the destination acknowledged since the start.",
        |d| d.delivered_bytes,
    );
    t.per_destination(
        &dests,
        "kakehashi_associations_open",
        "gauge",
        "Associations open to the destination.",
        |d| d.associations_open,
    );
    t.per_destination(&dests, "kakehashi_associations_allowed", "gauge", "Associations the destination is allowed now (fewer than configured after it refused more).", |d| d.associations_allowed);
    t.per_destination(
        &dests,
        "kakehashi_instances_on_the_wire",
        "gauge",
        "C-STOREs under way to the destination.",
        |d| d.in_flight,
    );
    t.per_destination(
        &dests,
        "kakehashi_connect_failures",
        "gauge",
        "Consecutive failures to reach the destination (0 once it answers).",
        |d| d.connect_failures,
    );

    let h = "kakehashi_cstore_duration_seconds";
    t.family(
        h,
        "histogram",
        "From C-STORE-RQ to the success response, of delivered instances.",
    );
    for d in &dests {
        let name = label(&d.name);
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(d.latency.counts) {
            cumulative += n;
            t.sample(
                &format!("{h}_bucket"),
                &format!("destination=\"{name}\",le=\"{b}\""),
                cumulative,
            );
        }
        t.sample(
            &format!("{h}_bucket"),
            &format!("destination=\"{name}\",le=\"+Inf\""),
            d.latency.count(),
        );
        t.sample(
            &format!("{h}_sum"),
            &format!("destination=\"{name}\""),
            d.latency.sum,
        );
        t.sample(
            &format!("{h}_count"),
            &format!("destination=\"{name}\""),
            d.latency.count(),
        );
    }

    if let Some(health) = &shared.tunnel_health {
        let th = health.borrow();
        let l = format!("interface=\"{}\"", label(&th.interface));
        t.family(
            "kakehashi_tunnel_up",
            "gauge",
            "1 while the tunnel has a recent handshake.",
        );
        t.sample("kakehashi_tunnel_up", &l, u8::from(th.up));
        if let Some(age) = th.last_handshake_age {
            t.family(
                "kakehashi_tunnel_last_handshake_age_seconds",
                "gauge",
                "Seconds since the last WireGuard handshake.",
            );
            t.sample(
                "kakehashi_tunnel_last_handshake_age_seconds",
                &l,
                age.as_secs(),
            );
        }
        t.family(
            "kakehashi_tunnel_handshakes_total",
            "counter",
            "WireGuard handshakes since the start.",
        );
        t.sample("kakehashi_tunnel_handshakes_total", &l, th.handshakes);
        t.family(
            "kakehashi_tunnel_received_bytes_total",
            "counter",
            "Bytes received through the tunnel.",
        );
        t.sample("kakehashi_tunnel_received_bytes_total", &l, th.rx_bytes);
        t.family(
            "kakehashi_tunnel_sent_bytes_total",
            "counter",
            "Bytes sent through the tunnel.",
        );
        t.sample("kakehashi_tunnel_sent_bytes_total", &l, th.tx_bytes);
    }
    t.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_once_in_its_bucket() {
        let mut h = Histogram::default();
        for ms in [1, 5, 6, 2000, 400_000] {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 5);
        assert_eq!(h.counts[0], 2, "1 ms and 5 ms are <= 0.005 s");
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[8], 1, "2 s is in the 2.5 s bucket");
        assert_eq!(h.over, 1, "400 s is only in +Inf");
        assert!((h.sum - 402.012).abs() < 1e-9);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
