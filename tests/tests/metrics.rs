//! The metrics endpoint as an operator's monitoring meets it: Debian's
//! Prometheus scrapes the box, and its query API answers with the box's
//! queue depth, deliveries and C-STORE latencies.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kakehashi_systest::testdata::{self, Name, Syntax};
use kakehashi_systest::*;

/// A real Prometheus scraping `target` every second.
struct Prometheus {
    port: u16,
    _dir: tempfile::TempDir,
    _child: Proc,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: kakehashi\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start prometheus (apt-get install prometheus)");
        let p = Prometheus {
            port,
            _dir: dir,
            _child: Proc(child),
        };
        wait_until("prometheus to be ready", Duration::from_secs(60), || {
            http(&format!("http://127.0.0.1:{port}/-/ready"), &[]).0 == 200
        });
        p
    }

    /// The value of an instant query's single sample, if it has one.
    fn query(&self, q: &str) -> Option<f64> {
        let (code, body) = http(
            &format!("http://127.0.0.1:{}/api/v1/query", self.port),
            &["-G", "--data-urlencode", &format!("query={q}")],
        );
        assert_eq!(code, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["status"], "success", "{body}");
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{q}: one sample expected: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// (status code, body) of a curl request.
fn http(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn data(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    testdata::study(
        dir,
        "metrics",
        "CT",
        testdata::CT_IMAGE,
        Syntax::ExplicitLe,
        Name::Ascii,
        n,
        32 * 1024,
    )
    .expect("data")
}

#[test]
fn prometheus_scrapes_the_queue_depth_deliveries_and_latency() {
    let work = tempfile::tempdir().expect("tempdir");
    let files = data(work.path(), 5);
    let metrics_port = free_port();
    let center_port = free_port();
    let mut opts = RelayOptions::to(center_port);
    opts.extra_toml = format!("\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    let relay = Relay::start(opts);
    // The center is down: what arrives waits in the queue.
    assert_eq!(storescu(relay.port, "MODALITY1", &files).acked.len(), 5);

    let prom = Prometheus::start(&format!("127.0.0.1:{metrics_port}"));
    wait_until(
        "Prometheus to see 5 instances queued",
        Duration::from_secs(60),
        || prom.query("sum(kakehashi_queue_instances)") == Some(5.0),
    );
    assert_eq!(
        prom.query("up{job=\"kakehashi\"}"),
        Some(1.0),
        "{}",
        prom.log()
    );
    assert_eq!(
        prom.query("kakehashi_queue_instances{destination=\"reading-center\",lane=\"medium\"}"),
        Some(5.0)
    );
    assert_eq!(prom.query("kakehashi_received_instances_total"), Some(5.0));
    let queued_bytes = prom
        .query("sum(kakehashi_queue_bytes)")
        .expect("queue bytes");
    assert_eq!(
        queued_bytes,
        prom.query("kakehashi_received_bytes_total")
            .expect("received bytes")
    );
    assert!(queued_bytes > 5.0 * 32.0 * 1024.0, "{queued_bytes}");
    assert!(prom.query("kakehashi_spool_free_bytes").expect("free") > 0.0);

    // The center comes up: the queue drains and the deliveries and their
    // latencies show.
    let center = StoreScp::start(center_port);
    relay.wait_drained(Duration::from_secs(60));
    assert_eq!(center.files().len(), 5);
    wait_until(
        "Prometheus to see the queue empty and 5 delivered",
        Duration::from_secs(30),
        || {
            prom.query("sum(kakehashi_queue_instances)") == Some(0.0)
                && prom.query("kakehashi_delivered_instances_total") == Some(5.0)
        },
    );
    assert_eq!(
        prom.query("kakehashi_cstore_duration_seconds_count"),
        Some(5.0)
    );
    let p99 = prom
        .query("histogram_quantile(0.99, kakehashi_cstore_duration_seconds_bucket)")
        .expect("a latency quantile");
    assert!(p99 > 0.0 && p99 <= 10.0, "{p99}");

    // Only GET /metrics is served.
    let url = format!("http://127.0.0.1:{metrics_port}");
    assert_eq!(http(&format!("{url}/metrics"), &[]).0, 200);
    assert_eq!(http(&format!("{url}/"), &[]).0, 404);
    assert_eq!(http(&format!("{url}/metrics"), &["-X", "POST"]).0, 405);
    let (code, _) = http(
        &format!("{url}/metrics"),
        &["-H", &format!("X-Long: {}", "a".repeat(10_000))],
    );
    assert_eq!(code, 431, "an oversized request head");
    assert_eq!(http(&format!("{url}/metrics"), &[]).0, 200, "still serving");
}

#[test]
fn a_metrics_address_on_the_tunnel_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kakehashi.toml");
    std::fs::write(
        &config,
        "[dicom]\nae_title = \"KAKEHASHI\"\nlisten = \"127.0.0.1:11112\"\n[[dicom.sources]]\nae_title = \"M\"\n[[destinations]]\nname = \"c\"\nae_title = \"C\"\naddress = \"10.8.0.1:104\"\n[spool]\ndir = \"/tmp/x\"\nmax_size = \"1 GiB\"\n[tunnel]\ninterface = \"kk0\"\nprivate_key_file = \"/k\"\naddress = [\"10.8.0.2/24\"]\n[tunnel.peer]\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nendpoint = \"192.0.2.1:51820\"\nallowed_ips = [\"10.8.0.0/24\"]\n[metrics]\nlisten = \"10.8.0.2:9102\"\n",
    )
    .expect("config");
    let out = Command::new(bin("kakehashid"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("kakehashid");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("metrics.listen") && err.contains("tunnel"),
        "{err}"
    );
}
