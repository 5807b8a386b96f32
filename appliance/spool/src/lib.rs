//! The durable store-and-forward spool.
//!
//! An instance is *accepted* when [`Incoming::commit`] returns: its payload
//! and its log entry were appended to a segment file and flushed once
//! (`fdatasync`, shared with concurrent instances where the segment is
//! used again: group commit; see [`segment`]), and its index record was committed with
//! its audit record (redb, `Durability::None`: a checkpoint makes it durable
//! within a second, and until then a restart applies the log entry again).
//! Only then may the ingress answer C-STORE Success. A payload larger than
//! half a segment goes to a file of its own, flushed with its directory
//! before a durable index commit. Nothing accepted is ever deleted except
//! when every destination has it (or an operator purges a dead letter).
//! Duplicates (same SOP Instance UID, same bytes, still spooled) and
//! corrections (same UID, other bytes: the older copy is superseded and
//! never sent after the newer one) are decided inside the index transaction,
//! in log order, so a replay decides the same.
//!
//! Layout of `spool.dir`:
//! - `index.redb` — instance records, SOP Instance UID map, audit trail,
//!   format marker and the newest log entry applied, the studies received
//!   or prefetched (results are matched against them; a new study's
//!   prefetch state lives there) and the list of studies whose prefetch is
//!   not finished
//! - `seg/<n>.seg` — segment files: frames of a payload and its log entry
//!   ([`segment`]); used again once nothing in them is needed
//! - `data/<id>.dcm` — payload files of large instances (and every payload
//!   of a spool written before format 2); a file without a record was never
//!   acknowledged and is removed at start-up
//! - payloads are Part 10 files (file meta header + the dataset as
//!   received), sealed when the spool has a key ([`seal`])
//! - `tmp/` — only in spools written before 0.1.1 (payloads were renamed from
//!   there); recovery still completes or removes what it finds there
//!
//! This crate is synchronous (std::fs + redb); the daemon calls it from
//! blocking tasks. It does not schedule (see the daemon's forwarder) and
//! does not parse DICOM (see `kakehashi-dicom`).
//!
//! Roles: every instance is the hospital's (`current`), a prior the box
//! retrieved from the hospital's PACS for one (`prior`: same destinations,
//! low lane), or a result from the reading center (`result`); [`Routing`]
//! gives each role its destinations. A result that matches no study in the
//! studies table is *held* (never sent) until the operator releases it. The
//! first instance of a new `current` study (with [`Routing::prefetch`])
//! opens its prefetch in the same commit; [`Spool::set_prefetch`] records
//! each step of it, and enters the chosen priors as `prior` studies in that
//! same transaction, so they are never chosen again.
//!
//! Space: `spool.max_size` counts payloads and the index; below
//! `spool.min_free` on the filesystem, and on ENOSPC anywhere (payload or
//! index), new instances are refused as out of space (the ingress answers
//! 0xA700). An I/O error fails redb until it is reopened: the next
//! transaction reopens it (redb repairs on open), so a disk that had filled
//! up serves again without a restart.

// One call into libc (`segment::write_out`, for the shared flush) is
// allowed by name; nothing else may be unsafe.
#![deny(unsafe_code)]

pub mod record;
pub mod seal;
mod segment;

pub use segment::Location;

pub use seal::SpoolKey;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use sha2::{Digest, Sha256};

pub use record::{
    Arrival, AuditEvent, AuditRecord, DecodeError, InstanceMeta, InstanceRecord, Notice, Prefetch,
    PrefetchState, Priority, ReportFacts, Role, Route, RouteState, StudyEntry, UrgentDetails,
    UrgentEntry, UrgentState,
};
pub use redb::Durability;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const INSTANCES: TableDefinition<u64, &[u8]> = TableDefinition::new("instances");
const UIDS: TableDefinition<&str, u64> = TableDefinition::new("uids");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Study Instance UID → [`StudyEntry`] of the studies received from the
/// hospital (results are matched against it).
const STUDIES: TableDefinition<&str, &[u8]> = TableDefinition::new("studies");
/// Study Instance UIDs whose prefetch is pending or retrieving, so the
/// prefetch loop never scans the whole (growing) studies table.
const PREFETCHING: TableDefinition<&str, ()> = TableDefinition::new("prefetching");
/// Urgent number → [`UrgentEntry`]: urgent results and their notices.
const URGENT: TableDefinition<u64, &[u8]> = TableDefinition::new("urgent");
/// The urgent entries not acknowledged yet: all the notice task and the
/// operator's release/purge look at (the `urgent` table keeps every entry,
/// routine reports too, and only grows).
const URGENT_OPEN: TableDefinition<u64, ()> = TableDefinition::new("urgent_open");

/// Magic and version of the spool as a whole (`meta["format"]`).
pub const FORMAT_MAGIC: &[u8; 4] = b"KKHS";
/// 2: payloads in segment files, the index updated from a log (see
/// [`segment`]); a version 1 spool is taken over as it is (its payloads stay
/// in their files and are read from there).
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The payload is not what was acknowledged: failed authentication or
    /// digest, wrong size, or missing. Never transient: the instance is
    /// dead-lettered (and never sent).
    #[error("integrity: payload {path}: {detail}")]
    Integrity { path: PathBuf, detail: String },
    /// The payload was sealed with a spool key this box no longer has (its
    /// TPM was reset, or it was provisioned again): it can never be read.
    #[error("key lost: payload {path}: {detail}; it cannot be decrypted (the box's TPM was reset or it was provisioned again): have the hospital send it again, then `kakehashi queue purge`")]
    KeyLost { path: PathBuf, detail: String },
    #[error("spool index {action}: {source}")]
    Index {
        action: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("spool index record {key} is unreadable: {source}")]
    Record {
        key: String,
        #[source]
        source: DecodeError,
    },
    #[error(
        "spool at {dir} has format {found}, this kakehashid understands version {FORMAT_VERSION}"
    )]
    Format { dir: PathBuf, found: String },
    #[error("spool is full: {used} bytes used of {max}; refusing new data (nothing queued is deleted to make room)")]
    Full { used: u64, max: u64 },
    #[error("filesystem of {dir} has {free} bytes free, below the {min_free} bytes kept free")]
    DiskLow {
        dir: PathBuf,
        free: u64,
        min_free: u64,
    },
    #[error("spool {dir} is in use by another kakehashid (one daemon per spool; is the service already running?)")]
    InUse { dir: PathBuf },
    #[error("no instance {0} in the spool")]
    NotFound(u64),
    #[error("no study {0} in the spool's studies table")]
    NoStudy(String),
    /// An operator change that does not apply (e.g. already acknowledged).
    #[error("{0}")]
    Refused(String),
    #[error("spool index {path} could not be reopened after an I/O error; retrying with the next operation")]
    IndexUnavailable { path: PathBuf },
}

impl SpoolError {
    /// Whether the failure means "no room" (DICOM 0xA700), as opposed to a fault.
    pub fn is_out_of_space(&self) -> bool {
        let no_room = |e: &std::io::Error| {
            [nix::errno::Errno::ENOSPC, nix::errno::Errno::EDQUOT]
                .iter()
                .any(|n| e.raw_os_error() == Some(*n as i32))
        };
        match self {
            SpoolError::Full { .. } | SpoolError::DiskLow { .. } => true,
            SpoolError::Io { source, .. } => no_room(source),
            SpoolError::Index {
                source: redb::Error::Io(e),
                ..
            } => no_room(e),
            _ => false,
        }
    }

    /// An error after which redb refuses every transaction until reopened.
    fn fails_index(&self) -> bool {
        matches!(
            self,
            SpoolError::Index {
                source: redb::Error::Io(_) | redb::Error::PreviousIo,
                ..
            }
        )
    }
}

/// For errors while reading a payload: what proves the bytes wrong (a failed
/// authentication or digest, a file cut short) is integrity; anything else
/// (EIO, ENOMEM…) is an I/O error, retried.
fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| match source.kind() {
        std::io::ErrorKind::InvalidInput
            if source
                .get_ref()
                .is_some_and(|e| e.downcast_ref::<seal::OtherKey>().is_some()) =>
        {
            SpoolError::KeyLost {
                path: path.to_path_buf(),
                detail: source.to_string(),
            }
        }
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            SpoolError::Integrity {
                path: path.to_path_buf(),
                detail: source.to_string(),
            }
        }
        _ => SpoolError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn idx<E: Into<redb::Error>>(action: &'static str) -> impl FnOnce(E) -> SpoolError {
    move |e| SpoolError::Index {
        action,
        source: e.into(),
    }
}

/// Which destinations get what: every instance gets a route to each
/// destination of its [`Role`].
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Instances from the hospital (`[[destinations]]`).
    pub current: Vec<String>,
    /// Results from the reading center (the hospital's PACS).
    pub results: Vec<String>,
    /// New hospital studies get their priors prefetched (`[priors]`).
    pub prefetch: bool,
    /// Results sent with priority HIGH are urgent findings (`[urgent]`).
    pub urgent: bool,
    /// Every other result is told to the RIS too (`[results.hl7]`).
    pub report_notices: bool,
}

impl Routing {
    pub fn for_role(&self, role: Role) -> &[String] {
        match role {
            Role::Current | Role::Prior => &self.current,
            Role::Result => &self.results,
        }
    }

    fn all(&self) -> impl Iterator<Item = &String> {
        self.current.iter().chain(&self.results)
    }
}

/// The destinations of the hospital's studies; no results.
impl From<Vec<String>> for Routing {
    fn from(current: Vec<String>) -> Routing {
        Routing {
            current,
            results: Vec::new(),
            prefetch: false,
            urgent: false,
            report_notices: false,
        }
    }
}

/// Limits the spool enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_size: u64,
    pub min_free: u64,
}

/// What start-up recovery found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: usize,
    pub temp_files_removed: usize,
    /// Payload files without an index record: never acknowledged, removed.
    pub orphan_files_removed: usize,
    /// Records whose payload file is missing or short: dead-lettered.
    pub missing_payloads: Vec<u64>,
    /// Pending records sealed with a spool key this box no longer has:
    /// dead-lettered as "key lost".
    pub key_lost: Vec<u64>,
    /// Records committed while their payload's rename was in flight: the
    /// rename was completed.
    pub renames_completed: usize,
    /// Log entries applied again: the power went after they were
    /// acknowledged and before the index had them durably.
    pub replayed: usize,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        self.temp_files_removed == 0
            && self.orphan_files_removed == 0
            && self.missing_payloads.is_empty()
            && self.key_lost.is_empty()
            && self.renames_completed == 0
            && self.replayed == 0
    }
}

/// Outcome of committing a received instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    Queued {
        record: Box<InstanceRecord>,
        /// A still-pending older version of the same instance (other bytes)
        /// that this one replaced: it is not sent any more.
        superseded: Option<u64>,
    },
    /// Same SOP Instance UID and same bytes as an instance still in the spool.
    Duplicate { existing: u64 },
}

/// How [`Spool::update_route`] records a change.
#[derive(Debug)]
pub struct RouteUpdate {
    /// `Immediate` for what must survive a crash; `None` where a crash
    /// only causes a re-send.
    pub durability: Durability,
    /// Audit record written in the same transaction.
    pub audit: Option<(AuditEvent, String)>,
    pub now_ms: u64,
    /// Keep the payload after the last delivery (retention).
    pub keep_payload: bool,
}

/// Per-destination numbers for `status`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DestinationCounts {
    pub queued: u64,
    pub queued_bytes: u64,
    pub dead_letter: u64,
    /// Held for the operator (results matching no study the box relayed).
    pub held: u64,
    /// Queued, and flagged stuck (see [`Route::stuck_ms`]).
    pub stuck: u64,
    pub oldest_received_ms: Option<u64>,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    data_dir: PathBuf,
    tmp_dir: PathBuf,
    /// `None` after a failed reopen; see [`Spool::reopen_index`].
    db: std::sync::RwLock<Option<Database>>,
    db_path: PathBuf,
    /// An I/O error (ENOSPC, EIO) failed a transaction: redb then refuses
    /// everything until the database is opened again, which the next
    /// transaction does.
    db_failed: std::sync::atomic::AtomicBool,
    /// See [`Spool::index_bytes`].
    index_blocks: AtomicU64,
    /// Dead letters per destination, kept as routes change (so `status` never
    /// scans the index).
    dead: std::sync::Mutex<HashMap<String, u64>>,
    /// Held routes per destination, kept the same way.
    held: std::sync::Mutex<HashMap<String, u64>>,
    routing: Routing,
    limits: Limits,
    /// Bytes of payload files in `data/`.
    used: AtomicU64,
    /// Bytes being received right now (counted against the limit).
    reserved: AtomicU64,
    next_id: AtomicU64,
    /// Payloads whose removal from the index is committed but perhaps not
    /// yet durable: unlinked after the next durable commit, so a crash can
    /// never leave a queued record without its payload.
    pending_unlink: std::sync::Mutex<Vec<Payload>>,
    /// Where payloads are appended (see [`segment`]).
    segments: segment::Segments,
    /// Orders the index updates of concurrently flushed frames.
    seq: Arc<segment::Sequencer>,
    /// The newest log entry the index has (perhaps not durably).
    applied_lsn: AtomicU64,
    /// The newest log entry the index has durably.
    durable_lsn: AtomicU64,
    last_durable: std::sync::Mutex<std::time::Instant>,
    /// The index was reopened after an I/O error: see [`Spool::catch_up`].
    needs_replay: std::sync::atomic::AtomicBool,
    /// A durable index commit failed for want of room: nothing new is
    /// accepted until one succeeds (the log would grow without end).
    index_full: std::sync::atomic::AtomicBool,
    /// Tests: the power goes after a frame's flush, before the index has it.
    #[cfg(test)]
    cut_before_index: std::sync::atomic::AtomicBool,
    /// With a key, payloads are sealed as they stream in and the index keeps
    /// the Patient ID sealed too (see [`seal`]).
    key: Option<SpoolKey>,
}

/// A sealed Patient ID in a record starts with this.
/// A Patient ID sealed with XChaCha20-Poly1305 in a record starts with this;
/// `sealed:` is version 1 (ChaCha20-Poly1305), still read.
const SEALED_PREFIX: &str = "sealed2:";
const SEALED_PREFIX_V1: &str = "sealed:";

impl Spool {
    /// Opens (creating if needed) the spool at `dir` and recovers it;
    /// payloads are stored in clear (development without keys).
    pub fn open(
        dir: &Path,
        routing: impl Into<Routing>,
        limits: Limits,
        now_ms: u64,
    ) -> Result<(Arc<Spool>, RecoveryReport), SpoolError> {
        Spool::open_with_key(dir, routing, limits, now_ms, None)
    }

    /// Like [`Spool::open`]; with `key`, new payloads and Patient IDs are sealed.
    pub fn open_with_key(
        dir: &Path,
        routing: impl Into<Routing>,
        limits: Limits,
        now_ms: u64,
        key: Option<SpoolKey>,
    ) -> Result<(Arc<Spool>, RecoveryReport), SpoolError> {
        let data_dir = dir.join("data");
        let tmp_dir = dir.join("tmp");
        for d in [dir, &data_dir] {
            fs::create_dir_all(d).map_err(io(d))?;
        }
        let db_path = dir.join("index.redb");
        let db = Database::create(&db_path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => SpoolError::InUse {
                dir: dir.to_path_buf(),
            },
            other => idx("open")(other),
        })?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            data_dir,
            tmp_dir,
            db: std::sync::RwLock::new(Some(db)),
            db_path,
            db_failed: Default::default(),
            index_blocks: AtomicU64::new(0),
            dead: Default::default(),
            held: Default::default(),
            routing: routing.into(),
            limits,
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            pending_unlink: std::sync::Mutex::new(Vec::new()),
            // A 64th of the spool's limit or of its filesystem, whichever is less.
            segments: segment::Segments::open(
                dir,
                segment::size_for(limits.max_size.min(fs_size(dir)?)),
            )?,
            seq: Default::default(),
            applied_lsn: AtomicU64::new(0),
            durable_lsn: AtomicU64::new(0),
            last_durable: std::sync::Mutex::new(std::time::Instant::now()),
            needs_replay: Default::default(),
            index_full: Default::default(),
            #[cfg(test)]
            cut_before_index: Default::default(),
            key,
        };
        spool.check_format()?;
        let replayed = spool.replay(None)?;
        let mut report = spool.recover(now_ms)?;
        report.replayed = replayed;
        Ok((Arc::new(spool), report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Free space on the spool's filesystem, for `status`.
    pub fn free_bytes(&self) -> Result<u64, SpoolError> {
        free_space(&self.dir)
    }

    /// Flushes made to acknowledge instances since start, and how many
    /// instances shared a flush another started (group commit).
    pub fn flush_counts(&self) -> (u64, u64) {
        self.segments.flush_counts()
    }

    /// What counts against `spool.max_size`: payloads and the index (it
    /// lives on the same disk).
    pub fn used_bytes(&self) -> u64 {
        self.payload_disk_bytes() + self.index_bytes()
    }

    /// Bytes of the payloads the spool holds (in files of their own and in
    /// segments).
    pub fn payload_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst) + self.segments.live_bytes()
    }

    /// Bytes on disk for payloads: files of their own, and segment files
    /// whole (what [`Limits::max_size`] counts).
    pub fn payload_disk_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst) + self.segments.allocated()
    }

    /// Disk blocks of the index (not its length: redb preallocates
    /// sparsely), as of the last commit.
    pub fn index_bytes(&self) -> u64 {
        self.index_blocks.load(Ordering::SeqCst)
    }

    fn measure_index(&self) {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(m) = fs::metadata(&self.db_path) {
            self.index_blocks.store(m.blocks() * 512, Ordering::SeqCst);
        }
    }

    /// Runs `f` on the index, opening it again first if an I/O error failed
    /// it (redb refuses everything after one until it is reopened; reopening
    /// repairs it). A box whose disk filled up thus serves again, without a
    /// restart, once there is room.
    fn with_db<T>(&self, f: impl Fn(&Database) -> Result<T, SpoolError>) -> Result<T, SpoolError> {
        if self.db_failed.load(Ordering::SeqCst) {
            self.reopen_index()?;
        }
        let attempt = || {
            let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
            let db = guard.as_ref().ok_or_else(|| SpoolError::IndexUnavailable {
                path: self.db_path.clone(),
            })?;
            f(db)
        };
        match attempt() {
            // Failed by an error inside an earlier transaction: reopen, once.
            Err(e) if e.fails_index() => {
                self.note_failure(&e);
                self.reopen_index()?;
                attempt()
            }
            other => other,
        }
    }

    fn note_failure(&self, e: &SpoolError) {
        if e.fails_index() {
            self.db_failed.store(true, Ordering::SeqCst);
        }
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, SpoolError> {
        self.with_db(|db| db.begin_read().map_err(idx("begin read")))
    }

    fn reopen_index(&self) -> Result<(), SpoolError> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.db_failed.load(Ordering::SeqCst) && guard.is_some() {
            return Ok(()); // another thread did it
        }
        // The old handle must go first: it holds the file lock.
        guard.take();
        let db = Database::create(&self.db_path).map_err(idx("reopen after an I/O error"))?;
        // Non-durable commits since the last durable one may be lost: a
        // delivery among them is undone, and its record is back. Its payload,
        // waiting in the pending list for the next durable commit, must stay.
        let back = {
            let txn = db.begin_read().map_err(idx("reopen after an I/O error"))?;
            let table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            let mut back = std::collections::HashSet::new();
            for p in self.pending().iter() {
                if table.get(p.id()).map_err(idx("read instance"))?.is_some() {
                    back.insert(p.id());
                }
            }
            back
        };
        if !back.is_empty() {
            self.pending().retain(|p| !back.contains(&p.id()));
            tracing::warn!(
                instances = back.len(),
                "deliveries undone by reopening the spool index: they are sent again after the next restart"
            );
        }
        *guard = Some(db);
        self.db_failed.store(false, Ordering::SeqCst);
        // Reopened, the index is where its last durable commit left it: the
        // log entries applied since must be applied again (see
        // [`Spool::catch_up`]).
        self.needs_replay.store(true, Ordering::SeqCst);
        tracing::warn!(index = %self.db_path.display(), "spool index reopened after an I/O error");
        Ok(())
    }

    /// After the index was reopened: applies again, in their turn, the log
    /// entries its last durable commit does not hold.
    fn catch_up(&self) -> Result<(), SpoolError> {
        if !self.needs_replay.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let ticket = self.seq.ticket();
        ticket.wait_turn();
        let done = self.replay(Some(ticket.lsn));
        if done.is_err() {
            self.needs_replay.store(true, Ordering::SeqCst);
        }
        ticket.finish();
        done.map(|_| ())
    }

    fn check_format(&self) -> Result<(), SpoolError> {
        let mut marker = FORMAT_MAGIC.to_vec();
        marker.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        let txn = self.with_db(|db| db.begin_write().map_err(idx("begin")))?;
        {
            let mut meta = txn.open_table(META).map_err(idx("open meta"))?;
            let found = meta
                .get("format")
                .map_err(idx("read format"))?
                .map(|v| v.value().to_vec());
            match found {
                None => {
                    meta.insert("format", marker.as_slice())
                        .map_err(idx("write format"))?;
                }
                Some(f) if f == marker => {}
                // Version 1: payload files only, which version 2 still reads;
                // from now on older kakehashid versions refuse the spool
                // (they would not find payloads in segments).
                Some(f)
                    if f.len() == 8
                        && f[..4] == FORMAT_MAGIC[..]
                        && f[4..] == 1u32.to_be_bytes() =>
                {
                    meta.insert("format", marker.as_slice())
                        .map_err(idx("write format"))?;
                }
                // Future format versions add their migrations here, oldest first.
                Some(f) => {
                    return Err(SpoolError::Format {
                        dir: self.dir.clone(),
                        found: if f.starts_with(FORMAT_MAGIC) && f.len() == 8 {
                            format!("version {}", u32::from_be_bytes([f[4], f[5], f[6], f[7]]))
                        } else {
                            "an unknown marker (not a Kakehashi spool?)".to_string()
                        },
                    })
                }
            }
            txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            txn.open_table(UIDS).map_err(idx("open uids"))?;
            txn.open_table(AUDIT).map_err(idx("open audit"))?;
            // Spools from before the urgent_open index get it once.
            if meta.get("urgent_open").map_err(idx("read meta"))?.is_none() {
                let urgent = txn.open_table(URGENT).map_err(idx("open urgent"))?;
                let mut open = txn
                    .open_table(URGENT_OPEN)
                    .map_err(idx("open urgent_open"))?;
                for item in urgent.iter().map_err(idx("scan urgent"))? {
                    let (k, v) = item.map_err(idx("scan urgent"))?;
                    let e: UrgentEntry =
                        record::decode(v.value()).map_err(|source| SpoolError::Record {
                            key: format!("urgent/{}", k.value()),
                            source,
                        })?;
                    if e.state != UrgentState::Acknowledged {
                        open.insert(e.id, ()).map_err(idx("write urgent_open"))?;
                    }
                }
                meta.insert("urgent_open", &b"1"[..])
                    .map_err(idx("write meta"))?;
            }
        }
        txn.commit().map_err(idx("commit format"))?;
        Ok(())
    }

    fn payload_path(&self, id: u64) -> PathBuf {
        self.data_dir.join(format!("{id:016x}.dcm"))
    }

    /// The payload of `rec`, to release once its record is durably gone.
    fn payload_of(&self, rec: &InstanceRecord) -> Payload {
        match rec.segment {
            Some(loc) => Payload::Segment(rec.id, loc.seg, rec.file_size()),
            None => Payload::File(rec.id, self.payload_path(rec.id), rec.file_size()),
        }
    }

    /// Applies the log entries the index does not have durably (the power
    /// went after their flush, before the index's): each frame newer than
    /// the index's last lsn is checked (its header digest, then its
    /// payload's digest or seal) and accepted again, in lsn order, exactly
    /// as it was accepted before. A frame that fails a check was cut by the
    /// power before its flush completed, so it was never acknowledged.
    ///
    /// At start (`before` = `None`) every such frame, and the log numbering
    /// continues after them; after a reopen of the index, those before lsn
    /// `before` (later ones are not applied yet).
    fn replay(&self, before: Option<u64>) -> Result<usize, SpoolError> {
        let applied = {
            let txn = self.read_txn()?;
            let meta = txn.open_table(META).map_err(idx("open meta"))?;
            let v = meta.get("applied_lsn").map_err(idx("read meta"))?;
            v.and_then(|v| v.value().try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0)
        };
        self.applied_lsn.store(applied, Ordering::SeqCst);
        self.durable_lsn.store(applied, Ordering::SeqCst);
        let mut frames = self.segments.scan(applied)?;
        frames.retain(|f| before.is_none_or(|b| f.lsn < b));
        frames.sort_by_key(|f| f.lsn);
        let mut last = applied;
        let mut replayed = 0;
        for f in frames {
            last = last.max(f.lsn);
            let entry: LogEntry = match record::decode(&f.body) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(lsn = f.lsn, "spool log entry not applied: {e}");
                    continue;
                }
            };
            let mut rec = entry.record;
            if rec.segment != Some(f.loc) || rec.file_size() != f.payload_len {
                tracing::warn!(
                    lsn = f.lsn,
                    "spool log entry not applied: it does not describe its own frame"
                );
                continue;
            }
            // Sealed with a key this start does not have (the TPM was reset,
            // or the key did not load): it cannot be checked, so it is kept,
            // and recovery says the key is lost. Never dropped unread.
            let ours = self.key.as_ref().map(SpoolKey::id_hex);
            let unreadable = rec.is_sealed() && (ours.is_none() || rec.key_id != ours);
            match self.verify_dataset(&DatasetRef::from(&rec)) {
                Ok(()) | Err(SpoolError::KeyLost { .. }) => {}
                Err(_) if unreadable => {}
                Err(e) => {
                    tracing::info!(
                        lsn = f.lsn,
                        "spool log entry cut by the power before it was acknowledged, dropped: {e}"
                    );
                    continue;
                }
            }
            if self.get(rec.id).is_ok() {
                continue;
            }
            let aad = format!("log {}", rec.meta.sop_instance_uid);
            if let Some(a) = entry
                .arrival
                .as_deref()
                .and_then(|a| self.open_text(&aad, a))
                .and_then(|a| serde_json::from_str(&a).ok())
            {
                rec.meta.arrival = a;
            }
            let patient = self
                .patient_id(&rec)
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty());
            let now_ms = rec.received_ms;
            self.commit_received(
                rec,
                entry.accession,
                patient,
                now_ms,
                Durability::None,
                f.lsn,
            )?;
            replayed += 1;
        }
        if before.is_none() {
            self.seq.start_after(last);
        }
        if replayed > 0 {
            self.begin_write(Durability::Immediate)?
                .commit("commit replay")?
                .unlink()?;
        }
        Ok(replayed)
    }

    /// Whether the index update of log entry `lsn` is also a checkpoint:
    /// the log between checkpoints stays short (start-up replays it) and
    /// emptied segments are freed.
    fn durability_for(&self, lsn: u64) -> Durability {
        let behind = lsn.saturating_sub(self.durable_lsn.load(Ordering::SeqCst));
        let since = self
            .last_durable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if behind >= 4096 || since >= std::time::Duration::from_secs(5) {
            Durability::Immediate
        } else {
            Durability::None
        }
    }

    fn recover(&self, now_ms: u64) -> Result<RecoveryReport, SpoolError> {
        let mut report = RecoveryReport::default();
        // Temp files: partial receptions (never acknowledged), or payloads
        // whose record committed while the rename was still in flight.
        let mut temp: HashMap<u64, (PathBuf, u64)> = HashMap::new();
        let mut strays = Vec::new();
        // Only spools written by kakehashi 0.1 before this version have a
        // tmp/ directory (payloads were renamed from there into data/).
        let old_tmp = match fs::read_dir(&self.tmp_dir) {
            Ok(d) => Some(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&self.tmp_dir)(e)),
        };
        for entry in old_tmp.into_iter().flatten() {
            let entry = entry.map_err(io(&self.tmp_dir))?;
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".part"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            let len = entry.metadata().map_err(io(&entry.path()))?.len();
            match id {
                Some(id) => {
                    temp.insert(id, (entry.path(), len));
                }
                None => strays.push(entry.path()),
            }
        }
        let mut on_disk: HashMap<u64, u64> = HashMap::new();
        for entry in fs::read_dir(&self.data_dir).map_err(io(&self.data_dir))? {
            let entry = entry.map_err(io(&self.data_dir))?;
            let name = entry.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".dcm"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            let len = entry.metadata().map_err(io(&entry.path()))?.len();
            match id {
                Some(id) => {
                    on_disk.insert(id, len);
                }
                None => {
                    tracing::warn!(file = %entry.path().display(), "unexpected file in spool data directory left alone")
                }
            }
        }

        let mut dead_counts: HashMap<String, u64> = HashMap::new();
        let mut held_counts: HashMap<String, u64> = HashMap::new();
        // Records per segment: the others are free again.
        let mut live: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
        // Each segment's length, read once (not once per record).
        let seg_len = self.segments.lengths();
        let txn = self.begin_write(Durability::Immediate)?;
        let mut max_id = 0;
        let mut used = 0;
        {
            let mut table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            let mut uids = txn.open_table(UIDS).map_err(idx("open uids"))?;
            let mut audit = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            let mut meta = txn.open_table(META).map_err(idx("open meta"))?;
            // Which spool key sealed what: records since 0.1.1 say it; for
            // older ones, the key the spool had when it was last opened.
            let current_key = self.key.as_ref().map(SpoolKey::id_hex);
            let previous_key = meta
                .get("spool_key")
                .map_err(idx("read meta"))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            // (record, what to say in the audit trail about it)
            let mut updates: Vec<(InstanceRecord, Option<String>)> = Vec::new();
            for item in table.iter().map_err(idx("scan instances"))? {
                let (k, v) = item.map_err(idx("scan instances"))?;
                let id = k.value();
                let mut rec: InstanceRecord = decode_record(id, v.value())?;
                report.records += 1;
                max_id = max_id.max(id);
                let mut changed = false;
                let mut said = None;
                // A destination added to the config since: route to it too.
                for d in self.routing.for_role(rec.meta.role) {
                    if rec.route(d).is_none() && !rec.is_done() {
                        rec.routes.push(new_route(d));
                        changed = true;
                    }
                }
                if let Some(loc) = rec.segment {
                    // In a segment: the segment must be there and long enough
                    // (its content is checked before it is sent).
                    let whole = seg_len
                        .get(&loc.seg)
                        .is_some_and(|len| *len >= loc.at + rec.file_size());
                    if whole || rec.is_done() {
                        if whole {
                            let l: &mut (u64, u64) = live.entry(loc.seg).or_default();
                            l.0 += 1;
                            l.1 += rec.file_size();
                        }
                    } else {
                        let why = "its segment file is missing or too short".to_string();
                        for r in rec.routes.iter_mut().filter(|r| r.state.is_pending()) {
                            r.state = RouteState::DeadLetter;
                            r.last_error = Some(format!("integrity: {why} (found at start-up)"));
                        }
                        report.missing_payloads.push(id);
                        changed = true;
                        said = Some(format!("integrity: {why} (found at start-up)"));
                    }
                } else if on_disk.get(&id) != Some(&rec.file_size()) {
                    // The record committed, the rename did not: finish it (the
                    // content was fsynced before the commit began).
                    if let Some((tmp, len)) =
                        temp.remove(&id).filter(|(_, len)| *len == rec.file_size())
                    {
                        let path = self.payload_path(id);
                        fs::rename(&tmp, &path).map_err(io(&path))?;
                        on_disk.insert(id, len);
                        report.renames_completed += 1;
                    }
                }
                match on_disk.remove(&id) {
                    _ if rec.segment.is_some() => {}
                    Some(len) if len == rec.file_size() => used += len,
                    found => {
                        if !rec.is_done() {
                            let why = match found {
                                Some(len) => format!(
                                    "payload file is {len} bytes, expected {}",
                                    rec.file_size()
                                ),
                                None => "payload file is missing".to_string(),
                            };
                            for r in rec.routes.iter_mut().filter(|r| r.state.is_pending()) {
                                r.state = RouteState::DeadLetter;
                                r.last_error =
                                    Some(format!("integrity: {why} (found at start-up)"));
                            }
                            report.missing_payloads.push(id);
                            changed = true;
                            said = Some(format!("integrity: {why} (found at start-up)"));
                            if let Some(len) = found {
                                used += len;
                            }
                        }
                    }
                }
                // Sealed with a key this box no longer has (TPM reset, then
                // provisioned again): never readable again, and not tampering.
                let sealed_with = rec.key_id.clone().or_else(|| previous_key.clone());
                if let (true, Some(ours), Some(theirs)) =
                    (rec.is_sealed(), &current_key, &sealed_with)
                {
                    if ours != theirs && rec.routes.iter().any(|r| r.state.is_pending()) {
                        let why = format!(
                            "key lost: sealed with spool key {theirs}, and this box's spool key is {ours} (its TPM was reset or it was provisioned again); it cannot be decrypted: have the hospital send it again, then `kakehashi queue purge`"
                        );
                        for r in rec.routes.iter_mut().filter(|r| r.state.is_pending()) {
                            r.state = RouteState::DeadLetter;
                            r.last_error = Some(why.clone());
                        }
                        report.key_lost.push(id);
                        changed = true;
                        said = Some(why);
                    }
                }
                for r in rec
                    .routes
                    .iter()
                    .filter(|r| r.state == RouteState::DeadLetter)
                {
                    *dead_counts.entry(r.destination.clone()).or_default() += 1;
                }
                for r in rec.routes.iter().filter(|r| r.state == RouteState::Held) {
                    *held_counts.entry(r.destination.clone()).or_default() += 1;
                }
                if changed {
                    updates.push((rec, said));
                }
            }
            if let Some(k) = &current_key {
                meta.insert("spool_key", k.as_bytes())
                    .map_err(idx("write meta"))?;
            }
            for (rec, said) in updates {
                let gone = match rec.segment {
                    Some(loc) => !live.contains_key(&loc.seg),
                    None => !self.payload_path(rec.id).exists(),
                };
                if rec.is_done() && gone {
                    table.remove(rec.id).map_err(idx("drop record"))?;
                    continue;
                }
                if let Some(why) = said {
                    append_audit(
                        &mut audit,
                        AuditRecord::new(now_ms, AuditEvent::DeadLettered, "kakehashid", why)
                            .instance(&rec.meta),
                    )?;
                }
                uids.insert(rec.meta.sop_instance_uid.as_str(), rec.id)
                    .map_err(idx("write uid"))?;
                table
                    .insert(rec.id, record::encode(&rec).as_slice())
                    .map_err(idx("write record"))?;
            }
        }
        txn.commit("commit recovery")?.unlink()?;
        self.segments.settle(&live);
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = dead_counts;
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = held_counts;

        // Renamed into data/ but never committed: the sender was never told
        // Success, so it still holds the image. Remove.
        for (id, _) in on_disk {
            let path = self.payload_path(id);
            fs::remove_file(&path).map_err(io(&path))?;
            report.orphan_files_removed += 1;
            max_id = max_id.max(id);
        }
        // Partial receptions: never acknowledged either.
        for (id, (path, _)) in temp {
            fs::remove_file(&path).map_err(io(&path))?;
            report.temp_files_removed += 1;
            max_id = max_id.max(id);
        }
        for path in strays {
            fs::remove_file(&path).map_err(io(&path))?;
            report.temp_files_removed += 1;
        }
        if report.orphan_files_removed > 0
            || report.temp_files_removed > 0
            || report.renames_completed > 0
        {
            sync_dir(&self.data_dir)?;
            if self.tmp_dir.exists() {
                sync_dir(&self.tmp_dir)?;
            }
        }
        self.used.store(used, Ordering::SeqCst);
        self.next_id.store(max_id + 1, Ordering::SeqCst);
        Ok(report)
    }

    /// Starts a write transaction. A durable one takes over the payloads
    /// released by earlier, non-durable commits: write transactions run one
    /// at a time, so everything in the list was committed before this one
    /// begins and becomes durable when it commits.
    fn begin_write(&self, durability: Durability) -> Result<Txn<'_>, SpoolError> {
        let durable = matches!(durability, Durability::Immediate);
        // Begun first: beginning may reopen the index, which sorts the list
        // out (see [`Spool::reopen_index`]) and must see all of it.
        let mut inner = self.with_db(|db| db.begin_write().map_err(idx("begin")))?;
        let released = Released {
            spool: self,
            list: if durable {
                std::mem::take(&mut *self.pending())
            } else {
                Vec::new()
            },
        };
        inner
            .set_durability(durability)
            .map_err(idx("set durability"))?;
        // Write transactions run one at a time: every log entry applied so
        // far is in this one, and durable when it commits durably.
        let covers = self.applied_lsn.load(Ordering::SeqCst);
        Ok(Txn {
            inner,
            released,
            durable,
            covers,
        })
    }

    /// Starts receiving instance `sop_instance_uid`: `header` (the Part 10
    /// file meta) is written first, then the dataset via [`Incoming::write`].
    /// With a key, everything is sealed from the first byte.
    pub fn begin(
        self: &Arc<Self>,
        header: &[u8],
        sop_instance_uid: &str,
    ) -> Result<Incoming, SpoolError> {
        self.check_room(header.len() as u64)?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        // Appended to a segment; one that outgrows it moves to a file of its
        // own (see [`PayloadOut`]).
        let writer = self.segments.take(None, |n| self.check_room(n))?;
        let what = self.segments.path(writer.seg);
        let out = PayloadOut {
            spool: Arc::clone(self),
            id,
            out: Some(Out::Segment(writer)),
            written: 0,
        };
        // Large fragments (the usual case) bypass the buffer; small ones are gathered.
        let buffered = std::io::BufWriter::with_capacity(128 * 1024, out);
        let mut sink = match &self.key {
            Some(k) => Sink::Sealed(
                seal::SealWriter::new(buffered, k, id, sop_instance_uid).map_err(io(&what))?,
            ),
            None => Sink::Plain(buffered),
        };
        let mut incoming = Incoming {
            spool: Arc::clone(self),
            id,
            file: None,
            header_len: header.len() as u64,
            dataset_len: 0,
            reserved: 0,
            // A sealed payload is authenticated by its seal; a digest would
            // only serve to tell a re-sent copy, which is rare and compared
            // byte for byte instead (see [`Spool::same_dataset`]).
            hasher: self.key.is_none().then(Sha256::new),
        };
        incoming.reserve(header.len() as u64)?;
        sink.write_all(header)
            .map_err(|e| incoming.write_error(e))?;
        incoming.file = Some(sink);
        Ok(incoming)
    }

    fn check_room(&self, extra: u64) -> Result<(), SpoolError> {
        self.catch_up()?;
        if self.index_full.load(Ordering::SeqCst) {
            // Refused until the index has room for a durable commit again.
            self.checkpoint()?;
        }
        let used = self.used_bytes() + self.reserved.load(Ordering::SeqCst);
        if used + extra > self.limits.max_size {
            return Err(SpoolError::Full {
                used,
                max: self.limits.max_size,
            });
        }
        let free = free_space(&self.dir)?;
        if free < self.limits.min_free + extra {
            return Err(SpoolError::DiskLow {
                dir: self.dir.clone(),
                free,
                min_free: self.limits.min_free,
            });
        }
        Ok(())
    }

    /// Calls `f` with every record in id order, one at a time (the daemon
    /// rebuilds its queues with this at start, without holding them all).
    pub fn for_each_record(&self, mut f: impl FnMut(&InstanceRecord)) -> Result<(), SpoolError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
        for item in table.iter().map_err(idx("scan instances"))? {
            let (k, v) = item.map_err(idx("scan instances"))?;
            f(&decode_record(k.value(), v.value())?);
        }
        Ok(())
    }

    /// Every record (listings and tests; see [`Spool::for_each_record`]).
    pub fn records(&self) -> Result<Vec<InstanceRecord>, SpoolError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(idx("scan instances"))? {
            let (k, v) = item.map_err(idx("scan instances"))?;
            out.push(decode_record(k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn get(&self, id: u64) -> Result<InstanceRecord, SpoolError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
        let v = table
            .get(id)
            .map_err(idx("read instance"))?
            .ok_or(SpoolError::NotFound(id))?;
        decode_record(id, v.value())
    }

    /// Counts by a full scan of the index: the reference for the counters
    /// kept as things change ([`Spool::dead_letters`] here, the forwarders'
    /// queues in the daemon), and for tools. Not for a hot path.
    pub fn counts(&self) -> Result<HashMap<String, DestinationCounts>, SpoolError> {
        let mut out: HashMap<String, DestinationCounts> = self
            .routing
            .all()
            .map(|d| (d.clone(), DestinationCounts::default()))
            .collect();
        for rec in self.records()? {
            for r in &rec.routes {
                let c = out.entry(r.destination.clone()).or_default();
                match r.state {
                    RouteState::Queued => {
                        c.queued += 1;
                        c.stuck += u64::from(r.stuck_ms.is_some());
                        c.queued_bytes += rec.dataset_size;
                        c.oldest_received_ms = Some(
                            c.oldest_received_ms
                                .map_or(rec.received_ms, |o| o.min(rec.received_ms)),
                        );
                    }
                    RouteState::DeadLetter => c.dead_letter += 1,
                    RouteState::Held => c.held += 1,
                    RouteState::Delivered => {}
                }
            }
        }
        Ok(out)
    }

    /// Where the payload of `rec` is: its file, or its segment file (for
    /// messages; see [`Spool::payload_location`]).
    fn dataset_path(&self, rec: &DatasetRef) -> PathBuf {
        match rec.segment {
            Some(loc) => self.segments.path(loc.seg),
            None => self.payload_path(rec.id),
        }
    }

    /// The file holding the payload of `rec`, the offset of the payload's
    /// first byte in it, and its length (tools and tests).
    pub fn payload_location(&self, rec: &InstanceRecord) -> (PathBuf, u64, u64) {
        match rec.segment {
            Some(loc) => (self.segments.path(loc.seg), loc.at, rec.file_size()),
            None => (self.payload_path(rec.id), 0, rec.file_size()),
        }
    }

    /// The dataset of `rec` as plaintext, from a clear or a sealed payload.
    /// A sealed one is authenticated chunk by chunk: tampering is an
    /// `InvalidData` error before the altered bytes are returned.
    pub fn dataset_reader(&self, rec: &DatasetRef) -> Result<Box<dyn Read + Send>, SpoolError> {
        let (reader, _) = self.open_dataset(rec)?;
        Ok(Box::new(reader.take(rec.size)))
    }

    /// The payload positioned at the dataset, read to the end of the file
    /// (not cut at the dataset's size); and whether it is sealed.
    fn open_dataset(&self, rec: &DatasetRef) -> Result<(Box<dyn Read + Send>, bool), SpoolError> {
        let path = self.dataset_path(rec);
        let raw: Box<dyn Read + Send> = match rec.segment {
            Some(loc) => Box::new(self.segments.reader(loc, rec.stored)?),
            None => Box::new(File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SpoolError::Integrity {
                    path: path.clone(),
                    detail: "the payload file is missing".into(),
                },
                _ => io(&path)(e),
            })?),
        };
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, raw);
        let mut magic = [0u8; 4];
        reader.read_exact(&mut magic).map_err(read_err(&path))?;
        if seal::is_sealed(&magic) {
            let key = self.key.as_ref().ok_or_else(|| SpoolError::Integrity {
                path: path.clone(),
                detail: "the payload is sealed and this spool has no key".into(),
            })?;
            let mut plain = seal::SealReader::new(reader, key, rec.id, &rec.sop_instance_uid)
                .map_err(read_err(&path))?;
            std::io::copy(&mut (&mut plain).take(rec.offset), &mut std::io::sink())
                .map_err(read_err(&path))?;
            Ok((Box::new(plain), true))
        } else {
            std::io::copy(
                &mut (&mut reader).take(rec.offset.saturating_sub(4)),
                &mut std::io::sink(),
            )
            .map_err(read_err(&path))?;
            Ok((Box::new(reader), false))
        }
    }

    /// Reads the whole payload of `rec` once, checking it: it must hold
    /// exactly the dataset; a sealed payload must authenticate to its last
    /// chunk (which also proves its content), a clear one must hash to the
    /// digest recorded when it was received.
    pub fn verify_dataset(&self, rec: &DatasetRef) -> Result<(), SpoolError> {
        let mut r = self.checked_reader(rec)?;
        std::io::copy(&mut r, &mut std::io::sink()).map_err(read_err(&r.path))?;
        Ok(())
    }

    /// Like [`Spool::verify_dataset`], returning the dataset (for small ones).
    pub fn read_dataset(&self, rec: &DatasetRef) -> Result<Vec<u8>, SpoolError> {
        let mut r = self.checked_reader(rec)?;
        let mut out = Vec::with_capacity(rec.size as usize);
        r.read_to_end(&mut out).map_err(read_err(&r.path))?;
        Ok(out)
    }

    /// The dataset of `rec`, checked as it is read, in one pass: the read
    /// that would complete it first reads the payload to its end and
    /// checks all of it (authentication to the last chunk, or the SHA-256
    /// recorded at reception, and the size), and fails instead of returning
    /// the last bytes if anything is wrong. So a consumer that sends what it
    /// reads never sends a whole dataset that fails its check (the forwarder
    /// sends the last fragment of a C-STORE only once it has its bytes).
    /// Opening checks what precedes the dataset (a missing file, a lost key,
    /// the header); read errors are `InvalidData` for a failed check and
    /// the disk's own kind otherwise.
    pub fn checked_reader(&self, rec: &DatasetRef) -> Result<CheckedReader, SpoolError> {
        let path = self.dataset_path(rec);
        let (inner, sealed) = self.open_dataset(rec)?;
        Ok(CheckedReader {
            inner,
            hasher: (!sealed).then(Sha256::new),
            expected: rec.sha256.clone(),
            left: rec.size,
            path,
        })
    }

    /// The Patient ID of `rec` in clear (the index keeps it sealed); `None`
    /// if it cannot be opened (no key, or not this spool's key).
    pub fn patient_id(&self, rec: &InstanceRecord) -> Option<String> {
        let aad = rec.id.to_be_bytes();
        let pid = &rec.meta.patient_id;
        if let Some(sealed) = pid.strip_prefix(SEALED_PREFIX) {
            self.key.as_ref()?.open_value(&aad, sealed)
        } else if let Some(sealed) = pid.strip_prefix(SEALED_PREFIX_V1) {
            self.key.as_ref()?.open_value_v1(&aad, sealed)
        } else {
            Some(pid.clone())
        }
    }

    /// Applies `change` to the route of `destination` in record `id`, writes
    /// `audit` in the same transaction, and deletes the payload once no route
    /// needs it (unless it is retained).
    pub fn update_route(
        &self,
        id: u64,
        destination: &str,
        how: RouteUpdate,
        change: impl FnOnce(&mut Route),
    ) -> Result<InstanceRecord, SpoolError> {
        let RouteUpdate {
            durability,
            audit,
            now_ms,
            keep_payload,
        } = how;
        let txn = self.begin_write(durability)?;
        let rec;
        let mut delete = false;
        let dead_change;
        {
            let mut table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            let v = table
                .get(id)
                .map_err(idx("read instance"))?
                .ok_or(SpoolError::NotFound(id))?;
            let mut r = decode_record(id, v.value())?;
            drop(v);
            let route = r.route_mut(destination).ok_or(SpoolError::NotFound(id))?;
            let was_dead = route.state == RouteState::DeadLetter;
            change(route);
            let is_dead = route.state == RouteState::DeadLetter;
            dead_change = i64::from(is_dead) - i64::from(was_dead);
            if let Some((event, detail)) = audit {
                let mut a = txn.open_table(AUDIT).map_err(idx("open audit"))?;
                append_audit(
                    &mut a,
                    AuditRecord::new(now_ms, event, "kakehashid", detail)
                        .instance(&r.meta)
                        .destination(destination),
                )?;
            }
            if r.is_done() && !keep_payload {
                table.remove(id).map_err(idx("remove instance"))?;
                let mut uids = txn.open_table(UIDS).map_err(idx("open uids"))?;
                unmap_uid(&mut uids, r.meta.sop_instance_uid.as_str(), id)?;
                delete = true;
            } else {
                table
                    .insert(id, record::encode(&r).as_slice())
                    .map_err(idx("write instance"))?;
            }
            rec = r;
        }
        let durable = txn.durable;
        let mut released = txn.commit("commit route")?;
        if dead_change != 0 {
            self.count_dead(&[(destination.to_string(), dead_change)]);
        }
        if delete {
            let entry = self.payload_of(&rec);
            if durable {
                released.list.push(entry);
            } else {
                self.pending().push(entry);
            }
        }
        released.unlink()?;
        Ok(rec)
    }

    /// Dead letters of `destination`, O(1).
    pub fn dead_letters(&self, destination: &str) -> u64 {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .copied()
            .unwrap_or(0)
    }

    /// Applies dead-letter count changes of a committed transaction.
    fn count_dead(&self, changes: &[(String, i64)]) {
        apply_counts(&self.dead, changes);
    }

    /// Held results of `destination`, O(1).
    pub fn held(&self, destination: &str) -> u64 {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(destination)
            .copied()
            .unwrap_or(0)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Payload>> {
        // The vector stays consistent whatever panicked while holding it.
        self.pending_unlink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Unlinks payloads whose records are durably gone, and frees the
    /// segments nothing needs any more.
    fn unlink(&self, list: Vec<Payload>) -> Result<(), SpoolError> {
        for payload in list {
            let (path, size) = match payload {
                Payload::File(_, path, size) => (path, size),
                Payload::Segment(_, seg, bytes) => {
                    self.segments.release(seg, bytes);
                    continue;
                }
            };
            match fs::remove_file(&path) {
                Ok(()) => {
                    let _ = self
                        .used
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                            Some(u.saturating_sub(size))
                        });
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        self.segments
            .reclaim(self.durable_lsn.load(Ordering::SeqCst));
        Ok(())
    }

    /// Makes every earlier commit durable and removes the payloads they
    /// released. Cheap when there is nothing pending.
    pub fn checkpoint(&self) -> Result<(), SpoolError> {
        self.catch_up()?;
        if self.pending().is_empty()
            && self.applied_lsn.load(Ordering::SeqCst) == self.durable_lsn.load(Ordering::SeqCst)
            && !self.index_full.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        let txn = self.begin_write(Durability::Immediate)?;
        txn.commit("commit checkpoint")?.unlink()?;
        // If beginning it reopened the index, it lacks the log's latest.
        self.catch_up()
    }

    /// Removes delivered instances whose retention has passed.
    pub fn sweep_retained(&self, older_than_ms: u64) -> Result<usize, SpoolError> {
        let done: Vec<InstanceRecord> = self
            .records()?
            .into_iter()
            .filter(|r| {
                r.is_done()
                    && r.routes
                        .iter()
                        .all(|x| x.delivered_ms.is_some_and(|t| t < older_than_ms))
            })
            .collect();
        if done.is_empty() {
            return Ok(0);
        }
        let txn = self.begin_write(Durability::Immediate)?;
        {
            let mut table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            let mut uids = txn.open_table(UIDS).map_err(idx("open uids"))?;
            for r in &done {
                table.remove(r.id).map_err(idx("remove instance"))?;
                unmap_uid(&mut uids, r.meta.sop_instance_uid.as_str(), r.id)?;
            }
        }
        let mut released = txn.commit("commit sweep")?;
        released
            .list
            .extend(done.iter().map(|r| self.payload_of(r)));
        released.unlink()?;
        Ok(done.len())
    }

    /// Puts dead letters (of one destination, or all) back in the queue.
    /// Returns the ids requeued.
    pub fn retry_dead(
        &self,
        destination: Option<&str>,
        ids: &[u64],
        now_ms: u64,
    ) -> Result<Vec<u64>, SpoolError> {
        self.operator_change(
            destination,
            ids,
            now_ms,
            AuditEvent::Retried,
            |route| route.state == RouteState::DeadLetter,
            |route| {
                route.state = RouteState::Queued;
                route.attempts = 0;
                route.next_attempt_ms = 0;
                route.stuck_ms = None;
                true
            },
        )
    }

    /// Releases held results (of the ids given, or all) for delivery.
    /// Returns the ids released.
    pub fn release_held(&self, ids: &[u64], now_ms: u64) -> Result<Vec<u64>, SpoolError> {
        self.operator_change(
            None,
            ids,
            now_ms,
            AuditEvent::Released,
            |route| route.state == RouteState::Held,
            |route| {
                route.state = RouteState::Queued;
                route.last_error = None;
                true
            },
        )
    }

    /// Drops held results (of the ids given, or all); their payloads are
    /// deleted.
    pub fn purge_held(&self, ids: &[u64], now_ms: u64) -> Result<Vec<u64>, SpoolError> {
        self.operator_change(
            None,
            ids,
            now_ms,
            AuditEvent::Purged,
            |route| route.state == RouteState::Held,
            |_| false,
        )
    }

    /// What the box knows of the hospital's study `uid` (`None`: never received).
    pub fn study(&self, uid: &str) -> Result<Option<StudyEntry>, SpoolError> {
        let txn = self.read_txn()?;
        let table = match txn.open_table(STUDIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(idx("open studies")(e)),
        };
        get_study(&table, uid)
    }

    /// Every study in the studies table, in Study Instance UID order.
    pub fn studies(&self) -> Result<Vec<(String, StudyEntry)>, SpoolError> {
        let txn = self.read_txn()?;
        let table = match txn.open_table(STUDIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(idx("open studies")(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(idx("scan studies"))? {
            let (k, v) = item.map_err(idx("scan studies"))?;
            let uid = k.value().to_string();
            let entry = record::decode(v.value()).map_err(|source| SpoolError::Record {
                key: format!("studies/{uid}"),
                source,
            })?;
            out.push((uid, entry));
        }
        Ok(out)
    }

    /// Current studies whose prefetch is due: pending and stable (nothing
    /// received for `stable_after_ms`) or retrieving (a crash interrupted
    /// it), and past their next attempt. Reads only the studies listed in
    /// the `prefetching` table, not the whole studies table.
    pub fn prefetch_due(
        &self,
        now_ms: u64,
        stable_after_ms: u64,
    ) -> Result<Vec<(String, StudyEntry)>, SpoolError> {
        let txn = self.read_txn()?;
        let (pending, studies) = match (txn.open_table(PREFETCHING), txn.open_table(STUDIES)) {
            (Ok(p), Ok(s)) => (p, s),
            (Err(redb::TableError::TableDoesNotExist(_)), _)
            | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
            (Err(e), _) | (_, Err(e)) => return Err(idx("open prefetching")(e)),
        };
        let mut out = Vec::new();
        for item in pending.iter().map_err(idx("scan prefetching"))? {
            let (k, _) = item.map_err(idx("scan prefetching"))?;
            let uid = k.value().to_string();
            let Some(e) = get_study(&studies, &uid)? else {
                continue;
            };
            let due = e.prefetch.as_ref().is_some_and(|p| {
                let stable = e.last_received_ms.saturating_add(stable_after_ms) <= now_ms;
                match p.state {
                    PrefetchState::Pending => stable && p.next_attempt_ms <= now_ms,
                    PrefetchState::Retrieving => p.next_attempt_ms <= now_ms,
                    PrefetchState::Done | PrefetchState::Failed => false,
                }
            });
            if due {
                out.push((uid, e));
            }
        }
        Ok(out)
    }

    /// Whether the hospital sent this box a study of the patient (a current
    /// study in the studies table with this Patient ID, and the same Issuer
    /// of Patient ID where both have one): the center's own queries are
    /// answered only for such patients. Reads the whole studies table.
    pub fn relayed_patient(
        &self,
        patient_id: &str,
        issuer: Option<&str>,
    ) -> Result<bool, SpoolError> {
        let patient_id = patient_id.trim();
        if patient_id.is_empty() {
            return Ok(false);
        }
        for (uid, e) in self.studies()? {
            if e.role != Role::Current {
                continue;
            }
            let opened = |v: &Option<String>| v.as_deref().and_then(|v| self.open_text(&uid, v));
            if opened(&e.patient).as_deref().map(str::trim) != Some(patient_id) {
                continue;
            }
            match (
                issuer.map(str::trim).filter(|i| !i.is_empty()),
                opened(&e.issuer),
            ) {
                (Some(asked), Some(known)) if asked != known.trim() => continue,
                _ => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Opens a value sealed in the studies table (Patient ID, issuer).
    pub fn open_study_value(&self, uid: &str, value: &str) -> Option<String> {
        self.open_text(uid, value)
    }

    /// `value` sealed with the spool key (associated data `aad`), or as it
    /// is on a development spool without a key.
    fn seal_text(&self, aad: &str, value: &str) -> String {
        match &self.key {
            Some(k) => format!("{SEALED_PREFIX}{}", k.seal_value(aad.as_bytes(), value)),
            None => value.to_string(),
        }
    }

    /// Opens what [`Self::seal_text`] made; `None` when it does not open
    /// (another key, tampering).
    pub fn open_text(&self, aad: &str, value: &str) -> Option<String> {
        match (&self.key, value.strip_prefix(SEALED_PREFIX)) {
            (Some(k), Some(sealed)) => k.open_value(aad.as_bytes(), sealed),
            (None, None) => Some(value.to_string()),
            _ => None,
        }
    }

    /// The details of an urgent entry, opened.
    pub fn urgent_details(&self, e: &UrgentEntry) -> Option<UrgentDetails> {
        serde_json::from_str(&self.open_text(&e.sop_instance_uid, &e.details)?).ok()
    }

    /// Every urgent entry, oldest first.
    pub fn urgent(&self) -> Result<Vec<UrgentEntry>, SpoolError> {
        let txn = self.read_txn()?;
        let table = match txn.open_table(URGENT) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(idx("open urgent")(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(idx("scan urgent"))? {
            let (k, v) = item.map_err(idx("scan urgent"))?;
            out.push(
                record::decode(v.value()).map_err(|source| SpoolError::Record {
                    key: format!("urgent/{}", k.value()),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Urgent entries not acknowledged whose next notice is due (reads only
    /// the open ones).
    pub fn urgent_due(&self, now_ms: u64) -> Result<Vec<UrgentEntry>, SpoolError> {
        Ok(self
            .urgent_open()?
            .into_iter()
            .filter(|e| !e.held && e.next_ms <= now_ms)
            .collect())
    }

    /// Urgent entries (and routine report notices) not acknowledged yet.
    pub fn urgent_open(&self) -> Result<Vec<UrgentEntry>, SpoolError> {
        let txn = self.read_txn()?;
        let (open, table) = match (txn.open_table(URGENT_OPEN), txn.open_table(URGENT)) {
            (Ok(o), Ok(t)) => (o, t),
            (Err(redb::TableError::TableDoesNotExist(_)), _)
            | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
            (Err(e), _) | (_, Err(e)) => return Err(idx("open urgent_open")(e)),
        };
        let mut out = Vec::new();
        for item in open.iter().map_err(idx("scan urgent_open"))? {
            let id = item.map_err(idx("scan urgent_open"))?.0.value();
            let Some(e) = get_urgent(&table, id)? else {
                continue;
            };
            if e.state != UrgentState::Acknowledged {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Changes urgent entry `id` with `change` and records `detail` in the
    /// audit trail (by `actor`), durably, in one transaction. The change
    /// sees the entry as stored and may refuse with an error message.
    pub fn update_urgent(
        &self,
        id: u64,
        actor: &str,
        now_ms: u64,
        change: impl FnOnce(&mut UrgentEntry) -> Result<String, String>,
    ) -> Result<UrgentEntry, SpoolError> {
        let txn = self.begin_write(Durability::Immediate)?;
        let entry = {
            let mut table = txn.open_table(URGENT).map_err(idx("open urgent"))?;
            let mut audit = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            let mut entry = get_urgent(&table, id)?.ok_or(SpoolError::NotFound(id))?;
            let detail = change(&mut entry).map_err(SpoolError::Refused)?;
            table
                .insert(id, record::encode(&entry).as_slice())
                .map_err(idx("write urgent"))?;
            let mut open = txn
                .open_table(URGENT_OPEN)
                .map_err(idx("open urgent_open"))?;
            if entry.state == UrgentState::Acknowledged {
                open.remove(id).map_err(idx("write urgent_open"))?;
            } else {
                open.insert(id, ()).map_err(idx("write urgent_open"))?;
            }
            let event = if entry.routine {
                AuditEvent::Report
            } else {
                AuditEvent::Urgent
            };
            let mut rec = AuditRecord::new(now_ms, event, actor, detail);
            rec.sop_instance_uid = Some(entry.sop_instance_uid.clone());
            rec.study_instance_uid = Some(entry.study_instance_uid.clone());
            append_audit(&mut audit, rec)?;
            entry
        };
        txn.commit("commit urgent")?.unlink()?;
        Ok(entry)
    }

    /// Records a prefetch step of study `uid` durably, with its audit record.
    /// With `priors`, those studies enter the studies table as `prior` in
    /// the same transaction, so no later prefetch (of this patient's next
    /// study) fetches them again.
    pub fn set_prefetch(
        &self,
        uid: &str,
        prefetch: Prefetch,
        priors: &[String],
        audit_detail: &str,
        now_ms: u64,
    ) -> Result<(), SpoolError> {
        let txn = self.begin_write(Durability::Immediate)?;
        {
            let mut studies = txn.open_table(STUDIES).map_err(idx("open studies"))?;
            let mut audit = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            let Some(mut entry) = get_study(&studies, uid)? else {
                return Err(SpoolError::NoStudy(uid.to_string()));
            };
            let mut pending = txn
                .open_table(PREFETCHING)
                .map_err(idx("open prefetching"))?;
            match prefetch.state {
                PrefetchState::Pending | PrefetchState::Retrieving => {
                    pending.insert(uid, ()).map_err(idx("write prefetching"))?
                }
                PrefetchState::Done | PrefetchState::Failed => {
                    pending.remove(uid).map_err(idx("write prefetching"))?
                }
            };
            entry.prefetch = Some(prefetch);
            studies
                .insert(uid, record::encode(&entry).as_slice())
                .map_err(idx("write study"))?;
            for p in priors {
                if studies
                    .get(p.as_str())
                    .map_err(idx("read study"))?
                    .is_some()
                {
                    continue;
                }
                let prior = StudyEntry {
                    patient: entry.patient.clone(),
                    issuer: entry.issuer.clone(),
                    ..StudyEntry::new(Role::Prior, now_ms)
                };
                studies
                    .insert(p.as_str(), record::encode(&prior).as_slice())
                    .map_err(idx("write study"))?;
            }
            let mut rec =
                AuditRecord::new(now_ms, AuditEvent::Prefetch, "kakehashid", audit_detail);
            rec.study_instance_uid = Some(uid.to_string());
            append_audit(&mut audit, rec)?;
        }
        txn.commit("commit prefetch")?.unlink()?;
        Ok(())
    }

    fn blind_accession(&self, accession: &str) -> String {
        let a = accession.trim();
        match &self.key {
            Some(k) => k.blind("accession", a),
            // Development spools (no key) keep a plain digest.
            None => hex::encode(&Sha256::digest(a.as_bytes())[..16]),
        }
    }

    /// Drops dead-lettered routes; deletes payloads nothing else needs.
    pub fn purge_dead(
        &self,
        destination: Option<&str>,
        ids: &[u64],
        now_ms: u64,
    ) -> Result<Vec<u64>, SpoolError> {
        self.operator_change(
            destination,
            ids,
            now_ms,
            AuditEvent::Purged,
            |route| route.state == RouteState::DeadLetter,
            |_| false,
        )
    }

    /// Moves queued routes (of one destination, or all; by id, or all, or
    /// only those flagged stuck) to the dead letters: the operator gives up
    /// on them. Returns the ids changed.
    pub fn dead_letter_queued(
        &self,
        destination: Option<&str>,
        ids: &[u64],
        stuck_only: bool,
        now_ms: u64,
    ) -> Result<Vec<u64>, SpoolError> {
        self.operator_change(
            destination,
            ids,
            now_ms,
            AuditEvent::DeadLettered,
            |route| route.state == RouteState::Queued && (!stuck_only || route.stuck_ms.is_some()),
            |route| {
                route.state = RouteState::DeadLetter;
                route.last_error = Some(format!(
                    "dead-lettered by the operator{}",
                    route
                        .last_error
                        .as_deref()
                        .map(|e| format!(" after: {e}"))
                        .unwrap_or_default()
                ));
                true
            },
        )
    }

    /// `change` returns whether to keep the route (false: drop it).
    fn operator_change(
        &self,
        destination: Option<&str>,
        ids: &[u64],
        now_ms: u64,
        event: AuditEvent,
        select: impl Fn(&Route) -> bool,
        change: impl Fn(&mut Route) -> bool,
    ) -> Result<Vec<u64>, SpoolError> {
        let txn = self.begin_write(Durability::Immediate)?;
        let mut touched = Vec::new();
        let mut to_delete = Vec::new();
        let mut dead_changes = Vec::new();
        let mut held_changes = Vec::new();
        {
            let mut table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            let mut uids = txn.open_table(UIDS).map_err(idx("open uids"))?;
            let mut audit = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            let mut recs = Vec::new();
            for item in table.iter().map_err(idx("scan instances"))? {
                let (k, v) = item.map_err(idx("scan instances"))?;
                if ids.is_empty() || ids.contains(&k.value()) {
                    recs.push(decode_record(k.value(), v.value())?);
                }
            }
            // Held urgent results released (true) or purged (false).
            let mut urgent_changes: Vec<(u64, bool)> = Vec::new();
            for mut rec in recs {
                let mut hit = false;
                let mut kept = Vec::new();
                for mut route in std::mem::take(&mut rec.routes) {
                    let selected =
                        select(&route) && destination.is_none_or(|d| d == route.destination);
                    if !selected {
                        kept.push(route);
                        continue;
                    }
                    hit = true;
                    append_audit(
                        &mut audit,
                        AuditRecord::new(
                            now_ms,
                            event,
                            "operator",
                            route.last_error.clone().unwrap_or_default(),
                        )
                        .instance(&rec.meta)
                        .destination(&route.destination),
                    )?;
                    let was_dead = route.state == RouteState::DeadLetter;
                    let was_held = route.state == RouteState::Held;
                    let keep = change(&mut route);
                    if was_held && rec.meta.role == Role::Result {
                        urgent_changes.push((rec.id, keep));
                    }
                    let is_held = keep && route.state == RouteState::Held;
                    held_changes.push((
                        route.destination.clone(),
                        i64::from(is_held) - i64::from(was_held),
                    ));
                    let is_dead = keep && route.state == RouteState::DeadLetter;
                    dead_changes.push((
                        route.destination.clone(),
                        i64::from(is_dead) - i64::from(was_dead),
                    ));
                    if keep {
                        kept.push(route);
                    }
                }
                rec.routes = kept;
                if !hit {
                    continue;
                }
                touched.push(rec.id);
                if rec.is_done() {
                    table.remove(rec.id).map_err(idx("remove instance"))?;
                    unmap_uid(&mut uids, rec.meta.sop_instance_uid.as_str(), rec.id)?;
                    to_delete.push(rec);
                } else {
                    table
                        .insert(rec.id, record::encode(&rec).as_slice())
                        .map_err(idx("write instance"))?;
                }
            }
            if !urgent_changes.is_empty() {
                let mut urgent = txn.open_table(URGENT).map_err(idx("open urgent"))?;
                let mut open = txn
                    .open_table(URGENT_OPEN)
                    .map_err(idx("open urgent_open"))?;
                let mut held_entries = Vec::new();
                let ids: Vec<u64> = open
                    .iter()
                    .map_err(idx("scan urgent_open"))?
                    .map(|i| i.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(idx("scan urgent_open"))?;
                for id in ids {
                    if let Some(e) = get_urgent(&urgent, id)?.filter(|e| e.held) {
                        held_entries.push(e);
                    }
                }
                for (result, released) in urgent_changes {
                    let Some(mut entry) =
                        held_entries.iter().find(|e| e.result_id == result).cloned()
                    else {
                        continue;
                    };
                    let id = entry.id;
                    let (what, event, sent, dropped) = if entry.routine {
                        (
                            "report notice",
                            AuditEvent::Report,
                            "it goes to the RIS now",
                            "the RIS is not told of it",
                        )
                    } else {
                        (
                            "urgent finding",
                            AuditEvent::Urgent,
                            "its finding is notified now",
                            "nobody is notified of it",
                        )
                    };
                    let detail = if released {
                        entry.held = false;
                        entry.next_ms = 0;
                        entry.last_error = None;
                        urgent
                            .insert(id, record::encode(&entry).as_slice())
                            .map_err(idx("write urgent"))?;
                        format!("held {what} {id} (result {result}) released: {sent}")
                    } else {
                        urgent.remove(id).map_err(idx("remove urgent"))?;
                        open.remove(id).map_err(idx("write urgent_open"))?;
                        format!("held {what} {id} (result {result}) purged: {dropped}")
                    };
                    let mut rec = AuditRecord::new(now_ms, event, "operator", detail);
                    rec.sop_instance_uid = Some(entry.sop_instance_uid);
                    rec.study_instance_uid = Some(entry.study_instance_uid);
                    append_audit(&mut audit, rec)?;
                }
            }
        }
        let mut released = txn.commit("commit operator change")?;
        self.count_dead(&dead_changes);
        apply_counts(&self.held, &held_changes);
        released
            .list
            .extend(to_delete.iter().map(|r| self.payload_of(r)));
        released.unlink()?;
        Ok(touched)
    }

    /// Appends an audit record that stands alone (associations, refusals).
    pub fn audit(&self, rec: AuditRecord) -> Result<(), SpoolError> {
        let txn = self.begin_write(Durability::Immediate)?;
        {
            let mut audit = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            append_audit(&mut audit, rec)?;
        }
        txn.commit("commit audit")?.unlink()
    }

    /// Moves the oldest audit records out of the index: those before
    /// `older_than_ms`, and the oldest beyond `max_records`, at most `batch`
    /// at a time. They are first appended to a new JSON-lines file in
    /// `export_dir` (`audit-<first seq>-<last seq>.jsonl`, fsynced, then its
    /// directory), and only then deleted: a crash in between exports some
    /// twice (the seq tells), never loses one. Returns how many moved.
    pub fn prune_audit(
        &self,
        older_than_ms: u64,
        max_records: u64,
        export_dir: &Path,
        batch: usize,
    ) -> Result<usize, SpoolError> {
        let victims: Vec<AuditRecord> = {
            let txn = self.read_txn()?;
            let table = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            let total = table.len().map_err(idx("count audit"))?;
            let mut over = total.saturating_sub(max_records);
            let mut out = Vec::new();
            for item in table.iter().map_err(idx("scan audit"))? {
                let (k, v) = item.map_err(idx("scan audit"))?;
                let rec: AuditRecord =
                    record::decode(v.value()).map_err(|source| SpoolError::Record {
                        key: format!("audit/{}", k.value()),
                        source,
                    })?;
                // The newest record always stays: sequence numbers continue
                // from it and must never be reused.
                if (over == 0 && rec.time_ms >= older_than_ms) || out.len() as u64 + 1 >= total {
                    break;
                }
                over = over.saturating_sub(1);
                out.push(rec);
                if out.len() >= batch {
                    break;
                }
            }
            out
        };
        let (Some(first), Some(last)) = (victims.first(), victims.last()) else {
            return Ok(0);
        };
        fs::create_dir_all(export_dir).map_err(io(export_dir))?;
        let path = export_dir.join(format!("audit-{:012}-{:012}.jsonl", first.seq, last.seq));
        let mut text = Vec::new();
        for r in &victims {
            // Plain structs serialize infallibly (see record::encode).
            serde_json::to_writer(&mut text, r).map_err(|e| io(&path)(e.into()))?;
            text.push(b'\n');
        }
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(io(&path))?;
        sync_dir(export_dir)?;
        let txn = self.begin_write(Durability::Immediate)?;
        {
            let mut table = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            for r in &victims {
                table.remove(r.seq).map_err(idx("remove audit"))?;
            }
        }
        txn.commit("commit audit prune")?.unlink()?;
        Ok(victims.len())
    }

    /// Audit records with `seq > after`, oldest first, at most `limit`.
    pub fn audit_since(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, SpoolError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(AUDIT).map_err(idx("open audit"))?;
        let mut out = Vec::new();
        for item in table.range(after + 1..).map_err(idx("scan audit"))? {
            let (k, v) = item.map_err(idx("scan audit"))?;
            out.push(
                record::decode(v.value()).map_err(|source| SpoolError::Record {
                    key: format!("audit/{}", k.value()),
                    source,
                })?,
            );
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// What a spool holds, read without opening it for writing (for `kakehashi
/// provision`, which must not replace a spool key that still seals data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Instances still needed by some destination (queued or dead letter).
    pub instances: u64,
}

/// Counts what the spool at `dir` holds, opening its index read-only (and
/// counting the log entries it does not have yet);
/// `Ok(None)` if there is no spool there. Fails with
/// [`SpoolError::InUse`] while kakehashid has it open (ask kakehashid).
pub fn inspect(dir: &Path) -> Result<Option<Held>, SpoolError> {
    let path = dir.join("index.redb");
    if !path.exists() {
        return Ok(None);
    }
    let in_use = |e: redb::DatabaseError| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => SpoolError::InUse {
            dir: dir.to_path_buf(),
        },
        other => idx("open")(other),
    };
    // A spool whose daemon stopped uncleanly needs redb's repair, which a
    // read-only open refuses: then open it for writing (nobody else has it),
    // as kakehashid would at its next start.
    let (_read_only, _repaired);
    let txn = match redb::ReadOnlyDatabase::open(&path) {
        Ok(db) => {
            let txn = db.begin_read().map_err(idx("begin read"))?;
            _read_only = db;
            txn
        }
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(SpoolError::InUse {
                dir: dir.to_path_buf(),
            })
        }
        Err(_) => {
            let db = Database::create(&path).map_err(in_use)?;
            let txn = db.begin_read().map_err(idx("begin read"))?;
            _repaired = db;
            txn
        }
    };
    // Accepted instances the index does not have durably yet (the power
    // went before it did): in the log, applied at kakehashid's next start.
    let applied = match txn.open_table(META) {
        Ok(meta) => meta
            .get("applied_lsn")
            .map_err(idx("read meta"))?
            .and_then(|v| v.value().try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0),
        Err(_) => 0,
    };
    let logged = if dir.join("seg").exists() {
        segment::Segments::open(dir, 0)?.scan(applied)?.len() as u64
    } else {
        0
    };
    let table = match txn.open_table(INSTANCES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Some(Held { instances: logged })),
        Err(e) => return Err(idx("open instances")(e)),
    };
    let mut instances = logged;
    for item in table.iter().map_err(idx("scan instances"))? {
        let (k, v) = item.map_err(idx("scan instances"))?;
        if !decode_record(k.value(), v.value())?.is_done() {
            instances += 1;
        }
    }
    Ok(Some(Held { instances }))
}

/// A write transaction and, if durable, the payloads its commit makes safe
/// to unlink.
struct Txn<'a> {
    inner: redb::WriteTransaction,
    released: Released<'a>,
    durable: bool,
    /// The newest log entry this transaction holds.
    covers: u64,
}

impl std::ops::Deref for Txn<'_> {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &redb::WriteTransaction {
        &self.inner
    }
}

impl<'a> Txn<'a> {
    fn commit(self, action: &'static str) -> Result<Released<'a>, SpoolError> {
        let Txn {
            inner,
            released,
            durable,
            covers,
        } = self;
        // On failure `released` drops and hands its payloads back to pending.
        if let Err(e) = inner.commit().map_err(idx(action)) {
            released.spool.note_failure(&e);
            if durable && e.is_out_of_space() {
                released.spool.index_full.store(true, Ordering::SeqCst);
            }
            return Err(e);
        }
        let spool = released.spool;
        spool.measure_index();
        if durable {
            spool.index_full.store(false, Ordering::SeqCst);
            spool.durable_lsn.fetch_max(covers, Ordering::SeqCst);
            *spool.last_durable.lock().unwrap_or_else(|p| p.into_inner()) =
                std::time::Instant::now();
        }
        Ok(released)
    }
}

/// Payloads whose records are durably removed. Dropped without
/// [`Released::unlink`], they go back to the pending list.
struct Released<'a> {
    spool: &'a Spool,
    list: Vec<Payload>,
}

/// A payload whose record (the first field, its id) is gone (see
/// [`Spool::payload_of`]).
#[derive(Debug)]
enum Payload {
    File(u64, PathBuf, u64),
    Segment(u64, u32, u64),
}

impl Payload {
    fn id(&self) -> u64 {
        match self {
            Payload::File(id, ..) | Payload::Segment(id, ..) => *id,
        }
    }
}

impl Released<'_> {
    fn unlink(mut self) -> Result<(), SpoolError> {
        let list = std::mem::take(&mut self.list);
        self.spool.unlink(list)
    }
}

impl Drop for Released<'_> {
    fn drop(&mut self) {
        if !self.list.is_empty() {
            let list = std::mem::take(&mut self.list);
            self.spool.pending().extend(list);
        }
    }
}

fn apply_counts(counts: &std::sync::Mutex<HashMap<String, u64>>, changes: &[(String, i64)]) {
    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
    for (d, delta) in changes {
        let n = counts.entry(d.clone()).or_default();
        *n = n.saturating_add_signed(*delta);
    }
}

fn route_word(state: RouteState) -> &'static str {
    match state {
        RouteState::Queued => "queued",
        RouteState::DeadLetter => "dead letter",
        RouteState::Delivered => "delivered",
        RouteState::Held => "held",
    }
}

fn new_route(destination: &str) -> Route {
    Route {
        destination: destination.to_string(),
        state: RouteState::Queued,
        attempts: 0,
        next_attempt_ms: 0,
        last_error: None,
        delivered_ms: None,
        stuck_ms: None,
    }
}

/// The studies-table entry of `uid`, decoded.
/// Urgent entry `id`, if any.
fn get_urgent(
    table: &impl redb::ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<UrgentEntry>, SpoolError> {
    match table.get(id).map_err(idx("read urgent"))? {
        Some(v) => record::decode(v.value())
            .map(Some)
            .map_err(|source| SpoolError::Record {
                key: format!("urgent/{id}"),
                source,
            }),
        None => Ok(None),
    }
}

fn get_study(
    studies: &impl ReadableTable<&'static str, &'static [u8]>,
    uid: &str,
) -> Result<Option<StudyEntry>, SpoolError> {
    studies
        .get(uid)
        .map_err(idx("read study"))?
        .map(|v| record::decode::<StudyEntry>(v.value()))
        .transpose()
        .map_err(|source| SpoolError::Record {
            key: format!("studies/{uid}"),
            source,
        })
}

/// Counts an accepted instance of a hospital study in the studies table.
/// True when it is a new study whose priors are to be prefetched.
fn note_study(
    studies: &mut redb::Table<&str, &[u8]>,
    rec: &InstanceRecord,
    accession: Option<String>,
    (patient, issuer): (Option<String>, Option<String>),
    prefetch: bool,
    now_ms: u64,
) -> Result<bool, SpoolError> {
    let uid = rec.meta.study_instance_uid.as_str();
    if uid.is_empty() {
        return Ok(false);
    }
    let existing = get_study(studies, uid)?;
    let new_prefetch = prefetch && existing.is_none();
    let mut entry = match existing {
        Some(e) => e,
        None => StudyEntry {
            // Once per study: resending it does not fetch its priors again.
            prefetch: prefetch.then(|| Prefetch {
                state: PrefetchState::Pending,
                attempts: 0,
                next_attempt_ms: 0,
                priors: Vec::new(),
                retrieved: Vec::new(),
                detail: None,
            }),
            ..StudyEntry::new(rec.meta.role, now_ms)
        },
    };
    if entry.patient.is_none() {
        entry.patient = patient;
    }
    if entry.issuer.is_none() {
        entry.issuer = issuer;
    }
    entry.last_received_ms = now_ms;
    entry.instances += 1;
    entry.bytes += rec.dataset_size;
    if let Some(a) = accession.filter(|a| !entry.accessions.contains(a)) {
        entry.accessions.push(a);
    }
    for (seen, list) in [
        (&rec.meta.arrival.modality, &mut entry.modalities),
        (&rec.meta.arrival.body_part, &mut entry.body_parts),
    ] {
        if let Some(v) = seen
            .as_ref()
            .filter(|v| !list.contains(v) && list.len() < 8)
        {
            list.push(v.clone());
        }
    }
    studies
        .insert(uid, record::encode(&entry).as_slice())
        .map_err(idx("write study"))?;
    Ok(new_prefetch)
}

/// `None` when the result belongs to a study the box received from the
/// hospital (same Study Instance UID, or same Accession Number); otherwise
/// why it is held.
fn match_result(
    studies: &redb::Table<&str, &[u8]>,
    rec: &InstanceRecord,
    accession: Option<&str>,
) -> Result<Option<String>, SpoolError> {
    let uid = rec.meta.study_instance_uid.as_str();
    if !uid.is_empty() && studies.get(uid).map_err(idx("read study"))?.is_some() {
        return Ok(None);
    }
    if let Some(a) = accession {
        for item in studies.iter().map_err(idx("scan studies"))? {
            let (k, v) = item.map_err(idx("scan studies"))?;
            let entry: StudyEntry =
                record::decode(v.value()).map_err(|source| SpoolError::Record {
                    key: format!("studies/{}", k.value()),
                    source,
                })?;
            if entry.accessions.iter().any(|x| x == a) {
                return Ok(None);
            }
        }
    }
    Ok(Some(format!(
        "unmatched: no study with Study Instance UID {uid:?}{} was relayed by this box; held (`kakehashi results release` to deliver it anyway)",
        if accession.is_some() {
            " or its Accession Number"
        } else {
            ""
        }
    )))
}

fn decode_record(id: u64, bytes: &[u8]) -> Result<InstanceRecord, SpoolError> {
    record::decode(bytes).map_err(|source| SpoolError::Record {
        key: format!("instances/{id}"),
        source,
    })
}

/// Drops the UID map entry of `id` (a newer instance with the same UID may
/// own it by now: then it stays).
fn unmap_uid(
    uids: &mut redb::Table<&str, u64>,
    sop_instance_uid: &str,
    id: u64,
) -> Result<(), SpoolError> {
    let mapped = uids
        .get(sop_instance_uid)
        .map_err(idx("read uid"))?
        .map(|v| v.value());
    if mapped == Some(id) {
        uids.remove(sop_instance_uid).map_err(idx("remove uid"))?;
    }
    Ok(())
}

fn next_seq(audit: &redb::Table<u64, &[u8]>) -> Result<u64, SpoolError> {
    Ok(audit
        .last()
        .map_err(idx("read audit"))?
        .map_or(1, |(k, _)| k.value() + 1))
}

/// Appends `rec` to the audit table of an open write transaction.
fn append_audit(
    audit: &mut redb::Table<u64, &[u8]>,
    mut rec: AuditRecord,
) -> Result<(), SpoolError> {
    rec.seq = next_seq(audit)?;
    audit
        .insert(rec.seq, record::encode(&rec).as_slice())
        .map_err(idx("write audit"))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn statvfs(dir: &Path) -> Result<nix::sys::statvfs::Statvfs, SpoolError> {
    nix::sys::statvfs::statvfs(dir).map_err(|e| SpoolError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::from(e),
    })
}

/// Size of the filesystem holding `dir`.
fn fs_size(dir: &Path) -> Result<u64, SpoolError> {
    let st = statvfs(dir)?;
    Ok(st.blocks() * st.fragment_size())
}

fn free_space(dir: &Path) -> Result<u64, SpoolError> {
    let st = statvfs(dir)?;
    Ok(st.blocks_available() * st.fragment_size())
}

/// A dataset read and checked in one pass (see [`Spool::checked_reader`]).
pub struct CheckedReader {
    inner: Box<dyn Read + Send>,
    /// A payload in clear is checked against its digest; a sealed one is
    /// authenticated chunk by chunk by its reader.
    hasher: Option<Sha256>,
    expected: String,
    /// Bytes of the dataset not yet returned.
    left: u64,
    path: PathBuf,
}

impl CheckedReader {
    fn failed(&self, what: String) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, what)
    }

    /// Reads the payload to its end and checks the whole of it.
    fn finish(&mut self) -> std::io::Result<()> {
        let mut rest = [0u8; 512];
        let extra = self.inner.read(&mut rest)?;
        if extra > 0 {
            return Err(self.failed("the payload is longer than the dataset recorded".into()));
        }
        if let Some(h) = self.hasher.take() {
            if hex::encode(h.finalize()) != self.expected {
                return Err(self.failed(
                    "the dataset does not match the digest recorded when it was received".into(),
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for CheckedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedReader")
            .field("path", &self.path)
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl Read for CheckedReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || out.is_empty() {
            return Ok(0);
        }
        let want = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(self.failed(format!(
                "the payload ends {} bytes before the end of the dataset recorded",
                self.left
            )));
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&out[..n]);
        }
        self.left -= n as u64;
        if self.left == 0 {
            // The bytes that complete the dataset only once all of it checked out.
            self.finish()?;
        }
        Ok(n)
    }
}

/// What [`Spool::dataset_reader`] needs to find and check a dataset.
#[derive(Debug, Clone)]
pub struct DatasetRef {
    pub id: u64,
    pub sop_instance_uid: String,
    pub offset: u64,
    pub size: u64,
    pub sha256: String,
    /// In a segment (else in a file of its own).
    pub segment: Option<Location>,
    /// Bytes of the payload as stored (see [`InstanceRecord::file_size`]).
    pub stored: u64,
}

impl From<&InstanceRecord> for DatasetRef {
    fn from(r: &InstanceRecord) -> Self {
        DatasetRef {
            id: r.id,
            sop_instance_uid: r.meta.sop_instance_uid.clone(),
            offset: r.dataset_offset,
            size: r.dataset_size,
            sha256: r.sha256.clone(),
            segment: r.segment,
            stored: r.file_size(),
        }
    }
}

/// Where an incoming payload goes: straight to its segment (or file), or sealed.
#[derive(Debug)]
enum Sink {
    Plain(std::io::BufWriter<PayloadOut>),
    Sealed(seal::SealWriter<std::io::BufWriter<PayloadOut>>),
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(bytes),
            Sink::Sealed(w) => w.write_all(bytes),
        }
    }

    /// Everything written, on disk (not yet flushed).
    fn finish(self) -> std::io::Result<PayloadOut> {
        let buffered = match self {
            Sink::Plain(w) => w,
            Sink::Sealed(w) => w.finish()?,
        };
        buffered.into_inner().map_err(|e| e.into_error())
    }
}

#[derive(Debug)]
enum Out {
    Segment(segment::Writer),
    File { file: File, path: PathBuf },
}

/// The bytes of one payload, in a segment frame while they fit (at most half
/// a segment), else in a file of their own: a payload that outgrows the room
/// left in its segment is copied to a fresh segment, or to its file. Dropped
/// before its commit, it leaves nothing: the segment takes the next frame
/// where this one would have started, the file is removed.
#[derive(Debug)]
struct PayloadOut {
    spool: Arc<Spool>,
    id: u64,
    /// `None` once committed.
    out: Option<Out>,
    written: u64,
}

impl PayloadOut {
    /// Moves what was written so far to where `more` bytes fit too.
    fn spill(&mut self, more: u64) -> std::io::Result<()> {
        let Some(Out::Segment(w)) = self.out.as_ref() else {
            return Ok(());
        };
        let spool = Arc::clone(&self.spool);
        let total = w.written + more;
        if total <= spool.segments.size() / 2 && w.start > 0 {
            // Another open segment with room for the whole frame, else a
            // free or new one.
            let need = segment::align(segment::HEADER_LEN + total + segment::BODY_ROOM);
            if let Ok(mut fresh) = spool.segments.take(Some(need), |n| spool.check_room(n)) {
                if total <= fresh.room() {
                    let copied = w.copy_to(&mut |b: &[u8]| fresh.append(b));
                    if let Err(e) = copied {
                        spool.segments.put_back(fresh.seg, fresh.start);
                        return Err(e);
                    }
                    // Too little left in it for an instance like this one.
                    spool.segments.put_back_full(w.seg);
                    self.out = Some(Out::Segment(fresh));
                    return Ok(());
                }
                spool.segments.put_back(fresh.seg, fresh.start);
            }
        }
        let path = spool.payload_path(self.id);
        let mut file = File::create(&path)?;
        if let Err(e) = w.copy_to(&mut |b: &[u8]| file.write_all(b)) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        spool.segments.put_back(w.seg, w.start);
        self.out = Some(Out::File { file, path });
        Ok(())
    }
}

impl Write for PayloadOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(Out::Segment(w)) = self.out.as_ref() {
            let more = buf.len() as u64;
            if more > w.room() || w.written + more > self.spool.segments.size() / 2 {
                self.spill(more)?;
            }
        }
        match self.out.as_mut() {
            Some(Out::Segment(w)) => w.append(buf)?,
            Some(Out::File { file, .. }) => file.write_all(buf)?,
            None => return Err(std::io::Error::other("payload already committed")),
        }
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for PayloadOut {
    fn drop(&mut self) {
        match self.out.take() {
            Some(Out::Segment(w)) => self.spool.segments.put_back(w.seg, w.start),
            Some(Out::File { path, .. }) => {
                let _ = fs::remove_file(&path);
            }
            None => {}
        }
    }
}

/// What the log keeps of an accepted instance until the index has it
/// durably: enough to accept it again, the same way, after a power cut.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LogEntry {
    record: InstanceRecord,
    /// Keyed digest of the Accession Number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accession: Option<String>,
    /// [`Arrival`] as JSON, sealed when the spool has a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arrival: Option<String>,
}

/// An instance being received. Dropping it without [`Incoming::commit`]
/// leaves nothing behind and releases its reservation.
#[derive(Debug)]
pub struct Incoming {
    spool: Arc<Spool>,
    id: u64,
    file: Option<Sink>,
    header_len: u64,
    dataset_len: u64,
    reserved: u64,
    /// `None` on a sealed spool.
    hasher: Option<Sha256>,
}

impl Incoming {
    pub fn id(&self) -> u64 {
        self.id
    }

    fn reserve(&mut self, n: u64) -> Result<(), SpoolError> {
        let before = self.spool.reserved.fetch_add(n, Ordering::SeqCst);
        self.reserved += n;
        let used = self.spool.used_bytes();
        if used + before + n > self.spool.limits.max_size {
            return Err(SpoolError::Full {
                used: used + before,
                max: self.spool.limits.max_size,
            });
        }
        Ok(())
    }

    fn write_error(&self, e: std::io::Error) -> SpoolError {
        io(&self.spool.payload_path(self.id))(e)
    }

    /// Appends dataset bytes. Fails with [`SpoolError::Full`] as soon as the
    /// spool would exceed its size; the caller then answers 0xA700.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.reserve(bytes.len() as u64)?;
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let written = file.write_all(bytes);
        self.file = Some(file);
        written.map_err(|e| self.write_error(e))?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        self.dataset_len += bytes.len() as u64;

        // Re-check the filesystem every 64 MiB: other writers share it.
        if self.dataset_len % (64 << 20) < bytes.len() as u64 {
            let free = free_space(&self.spool.dir)?;
            if free < self.spool.limits.min_free {
                return Err(SpoolError::DiskLow {
                    dir: self.spool.dir.clone(),
                    free,
                    min_free: self.spool.limits.min_free,
                });
            }
        }
        Ok(())
    }

    pub fn dataset_len(&self) -> u64 {
        self.dataset_len
    }

    /// Makes the instance durable and queues it for every destination.
    ///
    /// In a segment (the usual case): the payload, then the log entry, then
    /// the frame header are written and the segment flushed once; then the
    /// index is updated in log order, without a flush of its own (a later
    /// checkpoint makes it durable; until then a restart replays the log).
    /// In a file of its own (large payloads): the file and its directory
    /// are flushed, then the index commits durably. Whether this is a
    /// duplicate, a corrected version of a queued instance, or new is
    /// decided inside the index transaction, so two associations carrying
    /// the same instance cannot both queue it; a replay decides the same.
    pub fn commit(mut self, meta: InstanceMeta, now_ms: u64) -> Result<Accepted, SpoolError> {
        let spool = Arc::clone(&self.spool);
        let Some(writer) = self.file.take() else {
            return Err(self.write_error(std::io::Error::other("already committed")));
        };
        let mut out = writer.finish().map_err(|e| self.write_error(e))?;
        let stored = out.written;
        let sha256 = match self.hasher.take() {
            Some(h) => hex::encode(h.finalize()),
            None => no_digest(self.id),
        };

        let mut meta = meta;
        let patient = Some(meta.patient_id.trim().to_string()).filter(|p| !p.is_empty());
        let accession = meta
            .arrival
            .accession_number
            .take()
            .filter(|a| !a.trim().is_empty())
            .map(|a| spool.blind_accession(&a));
        if let Some(k) = &spool.key {
            // The index keeps no Patient ID in clear.
            meta.patient_id = format!(
                "{SEALED_PREFIX}{}",
                k.seal_value(&self.id.to_be_bytes(), &meta.patient_id)
            );
        }
        let mut rec = InstanceRecord {
            id: self.id,
            dataset_size: self.dataset_len,
            dataset_offset: self.header_len,
            sha256,
            received_ms: now_ms,
            routes: spool
                .routing
                .for_role(meta.role)
                .iter()
                .map(|d| new_route(d))
                .collect(),
            stored_size: (stored != self.header_len + self.dataset_len).then_some(stored),
            key_id: spool.key.as_ref().map(SpoolKey::id_hex),
            segment: None,
            meta,
        };
        let mut entry = None;
        if let Some(Out::Segment(w)) = out.out.as_ref() {
            rec.segment = Some(Location {
                seg: w.seg,
                at: w.payload_at(),
            });
            let aad = format!("log {}", rec.meta.sop_instance_uid);
            let arrival = serde_json::to_string(&rec.meta.arrival).unwrap_or_default();
            let body = record::encode(&LogEntry {
                record: rec.clone(),
                accession: accession.clone(),
                arrival: Some(spool.seal_text(&aad, &arrival)),
            });
            if (body.len() as u64) < segment::BODY_ROOM {
                entry = Some(body);
            } else {
                // Too much to log: the payload goes to its own file.
                rec.segment = None;
                out.spill(u64::MAX).map_err(|e| self.write_error(e))?;
            }
        }
        let ticket = spool.seq.ticket();
        let accepted = match (out.out.take(), entry) {
            (Some(Out::Segment(w)), Some(body)) => {
                spool.segments.note_lsn(w.seg, ticket.lsn);
                let sealed = w.seal_frame(ticket.lsn, &body);
                let next = match sealed {
                    Ok(next) => next,
                    Err(e) => {
                        spool.segments.put_back(w.seg, w.start);
                        return Err(self.write_error(e));
                    }
                };
                spool.segments.put_back(w.seg, next);
                #[cfg(test)]
                if spool.cut_before_index.load(Ordering::SeqCst) {
                    return Err(SpoolError::Refused("power cut (test)".into()));
                }
                ticket.wait_turn();
                let durability = spool.durability_for(ticket.lsn);
                match spool.commit_received(rec, accession, patient, now_ms, durability, ticket.lsn)
                {
                    Ok(a) => {
                        // Counted in its segment before the writer (which
                        // keeps the segment from being reclaimed) goes.
                        if let Accepted::Queued { record, .. } = &a {
                            w.hold(record.file_size());
                        }
                        a
                    }
                    Err(e) => {
                        // Refused: it must not come back at the next start.
                        w.void_frame(ticket.lsn, &body);
                        return Err(e);
                    }
                }
            }
            (Some(Out::File { file, path }), _) => {
                let synced = file.sync_all();
                drop(file);
                let keep = PathGuard(path);
                synced.map_err(io(&keep.0))?;
                sync_dir(&spool.data_dir)?;
                ticket.wait_turn();
                let lsn = ticket.lsn;
                let a = spool.commit_received(
                    rec,
                    accession,
                    patient,
                    now_ms,
                    Durability::Immediate,
                    lsn,
                )?;
                if let Accepted::Queued { record, .. } = &a {
                    spool.used.fetch_add(record.file_size(), Ordering::SeqCst);
                    // Committed: the file is the record's now.
                    keep.keep();
                }
                a
            }
            _ => return Err(self.write_error(std::io::Error::other("payload already committed"))),
        };
        ticket.finish();
        Ok(accepted)
    }
}

/// Removes a payload file on drop unless kept.
struct PathGuard(PathBuf);

impl PathGuard {
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// What [`InstanceRecord::sha256`] holds for a payload received without a
/// digest (a sealed one): never a hex digest, and never equal to another
/// record's, so an earlier kakehashid of the same spool format, which only
/// compares digests (after a rollback to the other slot), takes a re-send
/// for a correction, never for a duplicate.
fn no_digest(id: u64) -> String {
    format!("{NO_DIGEST}{id:016x}")
}

const NO_DIGEST: &str = "none:";

fn has_digest(sha256: &str) -> bool {
    !sha256.is_empty() && !sha256.starts_with(NO_DIGEST)
}

/// Reads until `buf` is full or the reader ends.
fn fill(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Spool {
    /// Whether `new` (just written) holds the same dataset as the spooled
    /// `old`: by digest when both have one, else byte for byte (a sealed
    /// payload has none; this happens only when an instance comes again
    /// while its first copy is still spooled). An `old` payload that cannot
    /// be read (key lost, damaged) is not the same: the new copy replaces it.
    fn same_dataset(&self, old: &InstanceRecord, new: &InstanceRecord) -> Result<bool, SpoolError> {
        if old.dataset_size != new.dataset_size {
            return Ok(false);
        }
        if has_digest(&old.sha256) && has_digest(&new.sha256) {
            return Ok(old.sha256 == new.sha256);
        }
        let Ok(mut theirs) = self.dataset_reader(&DatasetRef::from(old)) else {
            return Ok(false);
        };
        let new_ref = DatasetRef::from(new);
        let path = self.dataset_path(&new_ref);
        let mut ours = self.dataset_reader(&new_ref)?;
        let (mut a, mut b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        loop {
            let n = fill(&mut ours, &mut a).map_err(read_err(&path))?;
            let Ok(m) = fill(&mut theirs, &mut b) else {
                return Ok(false);
            };
            if a[..n] != b[..m] {
                return Ok(false);
            }
            if n == 0 {
                return Ok(true);
            }
        }
    }

    /// Commits a received instance: its record, UID mapping and audit
    /// record; or, if the instance is still spooled with the same bytes,
    /// only a `duplicate` audit record. A still-pending older version with
    /// other bytes is superseded in the same transaction.
    ///
    /// A study from the hospital is recorded in the studies table (with the
    /// keyed digest of its Accession Number); a result is matched against
    /// that table by Study Instance UID or Accession Number, and held when
    /// it matches nothing.
    ///
    /// `lsn` is the instance's log entry (recorded with it, so a restart
    /// replays only newer ones).
    fn commit_received(
        &self,
        mut rec: InstanceRecord,
        accession: Option<String>,
        patient: Option<String>,
        now_ms: u64,
        durability: Durability,
        lsn: u64,
    ) -> Result<Accepted, SpoolError> {
        let actor = format!("{}@{}", rec.meta.source_ae, rec.meta.source_ip);
        let mut txn = self.begin_write(durability)?;
        txn.covers = txn.covers.max(lsn);
        txn.open_table(META)
            .map_err(idx("open meta"))?
            .insert("applied_lsn", &lsn.to_be_bytes()[..])
            .map_err(idx("write meta"))?;
        let mut held = None;
        let mut urgent = None;
        let mut held_changes: Vec<(String, i64)> = Vec::new();
        let mut superseded = None;
        let mut release = None;
        let mut dead_changes = Vec::new();
        {
            let mut table = txn.open_table(INSTANCES).map_err(idx("open instances"))?;
            let mut uids = txn.open_table(UIDS).map_err(idx("open uids"))?;
            let mut audit = txn.open_table(AUDIT).map_err(idx("open audit"))?;
            let mut studies = txn.open_table(STUDIES).map_err(idx("open studies"))?;
            let previous = uids
                .get(rec.meta.sop_instance_uid.as_str())
                .map_err(idx("read uid"))?
                .map(|v| v.value());
            let previous = match previous {
                Some(id) => table
                    .get(id)
                    .map_err(idx("read instance"))?
                    .map(|v| decode_record(id, v.value()))
                    .transpose()?,
                None => None,
            };
            if let Some(old) = previous.filter(|p| !p.is_done()) {
                if self.same_dataset(&old, &rec)? {
                    append_audit(
                        &mut audit,
                        AuditRecord::new(
                            now_ms,
                            AuditEvent::Duplicate,
                            actor,
                            format!("identical to spooled instance {}; not queued again", old.id),
                        )
                        .instance(&rec.meta),
                    )?;
                    drop((table, uids, audit, studies));
                    txn.commit("commit duplicate")?.unlink()?;
                    self.applied_lsn.fetch_max(lsn, Ordering::SeqCst);
                    return Ok(Accepted::Duplicate { existing: old.id });
                }
                // A corrected version: the stale copy must never be sent after
                // it, so it is dropped (its delivered routes have what they had).
                for r in old.routes.iter().filter(|r| !r.state.is_final()) {
                    append_audit(
                        &mut audit,
                        AuditRecord::new(
                            now_ms,
                            AuditEvent::Superseded,
                            actor.clone(),
                            format!(
                                "spooled instance {} ({}) replaced by a corrected version (spool id {}, other bytes) before it was delivered",
                                old.id,
                                route_word(r.state),
                                rec.id
                            ),
                        )
                        .instance(&old.meta)
                        .destination(&r.destination),
                    )?;
                }
                superseded = Some(old.id);
                dead_changes.extend(
                    old.routes
                        .iter()
                        .filter(|r| r.state == RouteState::DeadLetter)
                        .map(|r| (r.destination.clone(), -1)),
                );
                held_changes.extend(
                    old.routes
                        .iter()
                        .filter(|r| r.state == RouteState::Held)
                        .map(|r| (r.destination.clone(), -1)),
                );
                table.remove(old.id).map_err(idx("remove instance"))?;
                release = Some(self.payload_of(&old));
            }
            match rec.meta.role {
                Role::Current | Role::Prior => {
                    let sealed = |v: &str| match &self.key {
                        Some(k) => format!(
                            "{SEALED_PREFIX}{}",
                            k.seal_value(rec.meta.study_instance_uid.as_bytes(), v)
                        ),
                        None => v.to_string(),
                    };
                    let who = (
                        patient.as_deref().map(sealed),
                        rec.meta.arrival.issuer.as_deref().map(sealed),
                    );
                    let prefetch = self.routing.prefetch && rec.meta.role == Role::Current;
                    if note_study(&mut studies, &rec, accession, who, prefetch, now_ms)? {
                        txn.open_table(PREFETCHING)
                            .map_err(idx("open prefetching"))?
                            .insert(rec.meta.study_instance_uid.as_str(), ())
                            .map_err(idx("write prefetching"))?;
                    }
                }
                Role::Result => {
                    let why = match rec.meta.arrival.hold.as_ref() {
                        Some(h) => Some(format!(
                            "{h}; held (`kakehashi results release {}` delivers it anyway, `kakehashi results purge {}` drops it)",
                            rec.id, rec.id
                        )),
                        None => match_result(&studies, &rec, accession.as_deref())?,
                    };
                    if let Some(why) = why {
                        for r in &mut rec.routes {
                            r.state = RouteState::Held;
                            r.last_error = Some(why.clone());
                        }
                        held = Some(why);
                    }
                    let urgent_reason = rec
                        .meta
                        .arrival
                        .urgent
                        .clone()
                        .filter(|_| self.routing.urgent);
                    let routine = urgent_reason.is_none() && self.routing.report_notices;
                    if let Some(reason) =
                        urgent_reason.or_else(|| routine.then(|| "routine report".to_string()))
                    {
                        let details = UrgentDetails {
                            patient_id: patient.clone().unwrap_or_default(),
                            facts: rec.meta.arrival.report.clone().unwrap_or_default(),
                        };
                        let mut table = txn.open_table(URGENT).map_err(idx("open urgent"))?;
                        let id = table
                            .last()
                            .map_err(idx("read urgent"))?
                            .map_or(1, |(k, _)| k.value() + 1);
                        let entry = UrgentEntry {
                            id,
                            result_id: rec.id,
                            sop_instance_uid: rec.meta.sop_instance_uid.clone(),
                            study_instance_uid: rec.meta.study_instance_uid.clone(),
                            received_ms: now_ms,
                            from: actor.clone(),
                            details: self.seal_text(
                                &rec.meta.sop_instance_uid,
                                &serde_json::to_string(&details).unwrap_or_default(),
                            ),
                            reason,
                            state: UrgentState::New,
                            notices: Vec::new(),
                            attempts: 0,
                            next_ms: 0,
                            // A result for no study this box relayed may be
                            // another hospital's patient: nobody is told
                            // until the operator releases it.
                            held: held.is_some(),
                            last_error: held.as_ref().map(|why| {
                                format!("the result is held ({why}); no notice until the operator releases it (kakehashi results release {})", rec.id)
                            }),
                            acknowledged_ms: None,
                            acknowledged_by: None,
                            routine,
                        };
                        table
                            .insert(id, record::encode(&entry).as_slice())
                            .map_err(idx("write urgent"))?;
                        txn.open_table(URGENT_OPEN)
                            .map_err(idx("open urgent_open"))?
                            .insert(id, ())
                            .map_err(idx("write urgent_open"))?;
                        urgent = Some((id, routine));
                    }
                }
            }
            table
                .insert(rec.id, record::encode(&rec).as_slice())
                .map_err(idx("write instance"))?;
            uids.insert(rec.meta.sop_instance_uid.as_str(), rec.id)
                .map_err(idx("write uid"))?;
            append_audit(
                &mut audit,
                AuditRecord::new(
                    now_ms,
                    AuditEvent::Received,
                    actor,
                    format!(
                        "{} bytes, {}{}{}",
                        rec.dataset_size,
                        rec.meta.transfer_syntax_uid,
                        match (rec.meta.role, rec.meta.amendment) {
                            (Role::Current, _) => "",
                            (Role::Prior, _) => ", prior",
                            (Role::Result, false) => ", result",
                            (Role::Result, true) => ", result (amendment)",
                        },
                        rec.meta
                            .arrival
                            .via
                            .as_deref()
                            .map(|v| format!(", {v}"))
                            .unwrap_or_default()
                    ),
                )
                .instance(&rec.meta),
            )?;
            if let Some((id, true)) = urgent {
                append_audit(
                    &mut audit,
                    AuditRecord::new(
                        now_ms,
                        AuditEvent::Report,
                        "kakehashid",
                        format!(
                            "report notice {id} (result {}): to be sent to the RIS{}",
                            rec.id,
                            if held.is_some() {
                                " once the result is released"
                            } else {
                                ""
                            }
                        ),
                    )
                    .instance(&rec.meta),
                )?;
            }
            if let Some((urgent, false)) = urgent {
                append_audit(
                    &mut audit,
                    AuditRecord::new(
                        now_ms,
                        AuditEvent::Urgent,
                        "kakehashid",
                        if held.is_some() {
                            format!("urgent finding {urgent} (result {}, {}) held: no notice until it is released", rec.id, rec.meta.arrival.urgent.as_deref().unwrap_or(""))
                        } else {
                            format!("urgent finding {urgent} (result {}, {}): to be notified", rec.id, rec.meta.arrival.urgent.as_deref().unwrap_or(""))
                        },
                    )
                    .instance(&rec.meta),
                )?;
            }
            if let Some(why) = &held {
                append_audit(
                    &mut audit,
                    AuditRecord::new(now_ms, AuditEvent::Held, "kakehashid", why.clone())
                        .instance(&rec.meta),
                )?;
            }
        }
        let mut released = txn.commit("commit instance")?;
        self.applied_lsn.fetch_max(lsn, Ordering::SeqCst);
        self.count_dead(&dead_changes);
        if held.is_some() {
            held_changes.extend(rec.routes.iter().map(|r| (r.destination.clone(), 1)));
        }
        apply_counts(&self.held, &held_changes);
        released.list.extend(release);
        released.unlink()?;
        Ok(Accepted::Queued {
            record: Box::new(rec),
            superseded,
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.spool
            .reserved
            .fetch_sub(self.reserved, Ordering::SeqCst);
        // Not committed: the payload (dropped with the sink) leaves nothing.
    }
}

#[cfg(test)]
mod tests;
