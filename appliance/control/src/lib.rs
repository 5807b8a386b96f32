//! The control protocol: one JSON request line, one JSON response line, over
//! the daemon's unix socket (`/run/kakehashi/control.sock`, mode 0660).
//!
//! The socket's file mode is the access control: root and the `kakehashi`
//! group may operate the box; nobody else can connect.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use kakehashi_spool::{AuditEvent, AuditRecord, Notice, Priority, RouteState, UrgentState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Status,
    QueueList {
        destination: Option<String>,
        dead_only: bool,
        /// At most this many entries, oldest first (`None`: all).
        #[serde(default)]
        limit: Option<usize>,
    },
    QueueRetry {
        destination: Option<String>,
        ids: Vec<u64>,
    },
    QueuePurge {
        destination: Option<String>,
        ids: Vec<u64>,
    },
    /// The operator gives up on queued instances (by id, or all of those
    /// flagged stuck): they become dead letters, to be purged or retried.
    QueueDeadLetter {
        destination: Option<String>,
        ids: Vec<u64>,
        stuck_only: bool,
    },
    Audit {
        after: u64,
        limit: usize,
    },
    /// The studies the box received from the hospital, and the priors it
    /// fetched for them.
    Studies,
    /// Results from the reading center still in the spool (on their way to
    /// the PACS, or held).
    Results,
    /// Delivers held results after all (by id; empty: all held).
    ResultsRelease {
        ids: Vec<u64>,
    },
    /// Drops held results (by id; never all at once).
    ResultsPurge {
        ids: Vec<u64>,
    },
    /// Urgent findings and their notices.
    Urgent,
    /// Someone took note of urgent finding `id`: notices stop.
    UrgentAck {
        id: u64,
        /// Who, in the operator's words (e.g. "Dr Sato, by phone").
        #[serde(default)]
        by: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    Status(Box<StatusReport>),
    Queue {
        entries: Vec<QueueEntry>,
        /// How many matched in all (more than `entries` when limited).
        #[serde(default)]
        total: u64,
    },
    Retried {
        ids: Vec<u64>,
    },
    Purged {
        ids: Vec<u64>,
    },
    DeadLettered {
        ids: Vec<u64>,
    },
    Audit {
        records: Vec<AuditRecord>,
    },
    Results {
        entries: Vec<ResultEntry>,
    },
    Studies {
        entries: Vec<StudyInfo>,
    },
    Released {
        ids: Vec<u64>,
    },
    Urgent {
        entries: Vec<UrgentInfo>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_s: u64,
    pub ae_title: String,
    pub listen: String,
    pub active_associations: usize,
    pub spool: SpoolStatus,
    pub destinations: Vec<DestinationStatus>,
    #[serde(default)]
    pub tunnel: Option<TunnelStatus>,
    #[serde(default)]
    pub tpm: Option<TpmStatus>,
    /// Urgent findings nobody acknowledged yet (with `[urgent]`).
    #[serde(default)]
    pub urgent_open: Option<u64>,
}

/// An urgent finding as `kakehashi urgent` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrgentInfo {
    /// Its number: `kakehashi urgent ack ID`.
    pub id: u64,
    /// The result's id in `kakehashi results` (to release it when held).
    pub result_id: u64,
    /// Held with its result: nobody is told until the result is released.
    pub held: bool,
    pub state: UrgentState,
    /// Why it is urgent (priority HIGH, or a configured code).
    #[serde(default)]
    pub reason: String,
    pub patient_id: String,
    /// Title and first text of the report.
    pub finding: String,
    /// When the report was made, as it says.
    pub made: Option<String>,
    pub physician: Option<String>,
    pub study_instance_uid: String,
    pub sop_instance_uid: String,
    /// The calling AE title and address it came from.
    pub from: String,
    pub received_ms: u64,
    pub notices: Vec<Notice>,
    /// When the next notice goes out (if not acknowledged).
    pub next_ms: u64,
    pub last_error: Option<String>,
    pub acknowledged_ms: Option<u64>,
    pub acknowledged_by: Option<String>,
}

/// The box's key store as kakehashid found it at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmStatus {
    /// `device:/dev/tpmrm0`, `swtpm:…`, or `software`.
    pub backend: String,
    pub serial: Option<String>,
    /// Why the keys are unusable, and what to do (re-enrollment steps).
    pub problem: Option<String>,
    /// Queued instances that can no longer be decrypted (their spool key is gone).
    pub undecryptable: Option<u64>,
    /// A development key store: not for patient data.
    pub warning: Option<String>,
}

/// The WireGuard tunnel as the supervisor last saw it (polled every second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub interface: String,
    /// A live session: a handshake within WireGuard's session lifetime
    /// (180 s) and something received within the last 40 s.
    pub up: bool,
    pub public_key: String,
    pub peer_public_key: String,
    /// The endpoint as configured (`host:port`).
    pub configured_endpoint: String,
    /// The address packets go to now.
    pub endpoint: Option<String>,
    pub last_handshake_age_s: Option<u64>,
    /// Handshakes seen since kakehashid started.
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpoolStatus {
    pub dir: String,
    /// What counts against `max_bytes`: payloads on disk (segment files
    /// whole, files of their own) and the index.
    pub used_bytes: u64,
    /// The payloads the spool holds (queued, dead letters, retained).
    #[serde(default)]
    pub payload_bytes: u64,
    /// The index's part of `used_bytes`.
    #[serde(default)]
    pub index_bytes: u64,
    pub max_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationStatus {
    pub name: String,
    pub ae_title: String,
    pub address: String,
    /// Reached through the tunnel (paused while it is down).
    #[serde(default)]
    pub via_tunnel: bool,
    /// idle | sending | stalled (a C-STORE without progress for 15 s) |
    /// backoff | paused (the tunnel is down)
    pub state: String,
    pub queued: u64,
    pub queued_bytes: u64,
    pub dead_letter: u64,
    /// Held results (matching no study the box relayed), for `[pacs]`.
    #[serde(default)]
    pub held: u64,
    /// Queued instances still refused after `retry.stuck_after*`.
    #[serde(default)]
    pub stuck: u64,
    pub oldest_age_s: Option<u64>,
    pub delivered_since_start: u64,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub next_attempt_in_s: Option<u64>,
    /// Connection attempts that failed in a row (0 once one succeeds).
    #[serde(default)]
    pub connect_failures: u32,
    /// How long the C-STORE under way has been running.
    #[serde(default)]
    pub sending_for_s: Option<u64>,
    /// How long since it last made progress (a fragment written).
    #[serde(default)]
    pub no_progress_for_s: Option<u64>,
    /// Associations open now, and how many may be (the configured number,
    /// fewer while the destination refuses more).
    #[serde(default)]
    pub associations: u64,
    #[serde(default)]
    pub associations_allowed: u64,
    #[serde(default)]
    pub associations_max: u64,
    /// Instances on the wire now.
    #[serde(default)]
    pub in_flight: u64,
    /// The studies this destination is sending or has queued (at most 10,
    /// those on the wire first).
    #[serde(default)]
    pub studies: Vec<StudyProgress>,
}

/// One study on its way to one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyProgress {
    pub study_instance_uid: String,
    /// Instances (and bytes) the box holds of it: received, or retrieved
    /// for a prior.
    pub received: u64,
    pub received_bytes: u64,
    /// Not yet acknowledged by this destination (those on the wire
    /// included).
    pub queued: u64,
    pub queued_bytes: u64,
    pub on_the_wire: u64,
    /// Acknowledged by this destination since kakehashid started.
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Bytes acknowledged per second over the last minute; `None` before
    /// two acknowledgements or after a minute without one.
    pub rate_bytes_per_s: Option<u64>,
    /// `queued_bytes` at that rate.
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: u64,
    pub destination: String,
    pub state: RouteState,
    pub priority: Priority,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub patient_id: String,
    pub source_ae: String,
    pub size: u64,
    pub received_ms: u64,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Flagged stuck (still retried).
    #[serde(default)]
    pub stuck: bool,
}

/// A study as `kakehashi studies` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyInfo {
    pub study_instance_uid: String,
    /// `current` (sent by the hospital) or `prior` (fetched for one).
    pub role: String,
    pub patient_id: String,
    /// Instances received (for a prior: retrieved) and their bytes.
    pub instances: u64,
    pub bytes: u64,
    /// Of those, still waiting for a destination's acknowledgement.
    #[serde(default)]
    pub pending: u64,
    /// Of those, dead-lettered for some destination (the operator decides).
    #[serde(default)]
    pub dead_letters: u64,
    /// Of those, acknowledged by every destination ("complete at the
    /// center" when it equals `instances`).
    #[serde(default)]
    pub acknowledged: u64,
    /// Bytes of the pending instances, and of the acknowledged ones.
    #[serde(default)]
    pub pending_bytes: u64,
    #[serde(default)]
    pub acknowledged_bytes: u64,
    /// Instances on the wire now (to any destination).
    #[serde(default)]
    pub on_the_wire: u64,
    /// Bytes of it acknowledged per second over the last minute (every
    /// destination together).
    #[serde(default)]
    pub rate_bytes_per_s: Option<u64>,
    /// When the last destination will have it all, at the rates measured;
    /// `None` while a destination with something pending has no rate yet.
    #[serde(default)]
    pub eta_s: Option<u64>,
    /// Every received instance acknowledged by every destination.
    #[serde(default)]
    pub complete: bool,
    pub first_received_ms: u64,
    pub last_received_ms: u64,
    /// pending | retrieving | done | failed (current studies with `[priors]`).
    pub prefetch: Option<String>,
    /// The priors chosen for it.
    pub priors: Vec<String>,
    pub detail: Option<String>,
}

/// A result from the reading center, as `kakehashi results` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEntry {
    pub id: u64,
    /// Towards the PACS: queued, held or dead-letter.
    pub state: RouteState,
    pub priority: Priority,
    /// It amends an earlier result (Predecessor Documents Sequence).
    pub amendment: bool,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub patient_id: String,
    /// Calling AE title and address it came from.
    pub source_ae: String,
    pub source_ip: String,
    pub size: u64,
    pub received_ms: u64,
    pub attempts: u32,
    /// Why it is held, or the last delivery error.
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to kakehashid at {path}: {source} (is kakehashid running? is --socket right? are you root or in the kakehashi group?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kakehashid sent an answer this CLI does not understand: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    Ok(serde_json::from_str(&answer)?)
}
