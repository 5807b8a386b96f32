//! What the index stores, and how it is encoded on disk.
//!
//! Every value starts with one format byte ([`RECORD_VERSION`]) followed by
//! JSON. A reader that meets a newer version refuses it rather than guess;
//! older versions are upgraded by [`crate::Spool::open`]'s migrations.

use serde::{Deserialize, Serialize};

/// Version byte written before every record value.
pub const RECORD_VERSION: u8 = 1;

/// C-STORE priority, as the sender gave it (PS3.7 C.4.1.1.2 Priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    /// From the DIMSE Priority field (0000,0700).
    pub fn from_dimse(value: u16) -> Priority {
        match value {
            0x0001 => Priority::High,
            0x0002 => Priority::Low,
            _ => Priority::Medium,
        }
    }

    pub fn to_dimse(self) -> u16 {
        match self {
            Priority::Medium => 0x0000,
            Priority::High => 0x0001,
            Priority::Low => 0x0002,
        }
    }
}

/// Why the box holds an instance: what it relays, and to whom.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sent by the hospital: goes to `[[destinations]]`.
    #[default]
    Current,
    /// A prior study the box fetched from the hospital's PACS for a new
    /// one: goes to `[[destinations]]` too, after current studies (low
    /// priority), and never causes a prefetch itself.
    Prior,
    /// A result (report, SR, KOS) sent back by the reading center: goes to
    /// the hospital's PACS, once matched to a study the box relayed.
    Result,
}

impl Role {
    pub fn is_current(&self) -> bool {
        *self == Role::Current
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Current => "current",
            Role::Prior => "prior",
            Role::Result => "result",
        }
    }
}

/// Where one instance stands towards one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteState {
    /// Waiting to be sent (or being sent: a send in progress is not recorded,
    /// so a crash simply leaves the route queued).
    Queued,
    Delivered,
    DeadLetter,
    /// Kept, not sent, until the operator releases or purges it: a result
    /// that matches no study the box relayed (`last_error` says why).
    Held,
}

impl RouteState {
    pub fn is_pending(self) -> bool {
        self == RouteState::Queued
    }

    /// Nothing more will be done for this route.
    pub fn is_final(self) -> bool {
        self == RouteState::Delivered
    }
}

/// What the box knows of a study it received from the hospital (table
/// `studies`): enough to match a result to it, kept after its instances
/// are delivered and gone from the spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudyEntry {
    pub first_received_ms: u64,
    pub last_received_ms: u64,
    /// Instances accepted for this study (duplicates not counted).
    pub instances: u64,
    pub bytes: u64,
    /// Keyed digests ([`crate::SpoolKey::blind`]) of the Accession Numbers seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accessions: Vec<String>,
    /// `current` (sent by the hospital) or `prior` (fetched for one).
    #[serde(default, skip_serializing_if = "Role::is_current")]
    pub role: Role,
    /// Patient ID and Issuer of Patient ID, sealed like the records' (to
    /// query the PACS for priors; never a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Modalities and body parts seen in its instances (at most 8 each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modalities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_parts: Vec<String>,
    /// Prefetch of this study's priors (current studies, with `[priors]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Prefetch>,
}

impl StudyEntry {
    /// A study first seen at `now_ms`, with nothing counted yet.
    pub fn new(role: Role, now_ms: u64) -> StudyEntry {
        StudyEntry {
            first_received_ms: now_ms,
            last_received_ms: now_ms,
            instances: 0,
            bytes: 0,
            accessions: Vec::new(),
            role,
            patient: None,
            issuer: None,
            modalities: Vec::new(),
            body_parts: Vec::new(),
            prefetch: None,
        }
    }
}

/// Where the prefetch of a study's priors stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefetch {
    pub state: PrefetchState,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    /// The prior studies chosen (Study Instance UIDs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priors: Vec<String>,
    /// Those of `priors` whose C-MOVE has finished: a restart retrieves
    /// only the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retrieved: Vec<String>,
    /// What happened, in words (counts, or the last error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefetchState {
    /// Waiting for the study to be stable (or for the next attempt).
    Pending,
    /// Priors chosen and being retrieved: retried from here after a crash.
    Retrieving,
    Done,
    /// Given up (the PACS refused the query permanently); shown in status.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub destination: String,
    pub state: RouteState,
    pub attempts: u32,
    /// Unix milliseconds before which no new attempt is made.
    pub next_attempt_ms: u64,
    pub last_error: Option<String>,
    pub delivered_ms: Option<u64>,
    /// When it was flagged stuck: still retried after `retry.stuck_after*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck_ms: Option<u64>,
}

/// What the ingress knows about an instance when it is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMeta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub study_instance_uid: String,
    pub patient_id: String,
    pub source_ae: String,
    pub source_ip: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Role::is_current")]
    pub role: Role,
    /// A result that amends an earlier one (it has a Predecessor Documents
    /// Sequence).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub amendment: bool,
    /// What the ingress learned on arrival that the record does not keep.
    #[serde(skip)]
    pub arrival: Arrival,
}

/// What the ingress learned of an instance as it arrived: used once, when
/// the spool accepts it (studies table, urgent table, audit), and never
/// stored in the instance's record (the spool's log keeps it, sealed, until
/// the index has it durably: see `crate::segment`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// Accession Number (0008,0050): the studies table keeps a keyed digest
    /// of it, to match results by.
    pub accession_number: Option<String>,
    /// Issuer of Patient ID (0010,0021): kept (sealed) in the studies table,
    /// to query the PACS for priors.
    pub issuer: Option<String>,
    /// How it reached the box, for the `received` audit record (a result:
    /// "through the tunnel from WireGuard peer …, DICOM signature verified").
    pub via: Option<String>,
    /// What a result says of itself (read by the ingress from SRs and
    /// encapsulated documents): kept, sealed, with an urgent notice only.
    pub report: Option<ReportFacts>,
    /// Why this result is an urgent finding (set by the ingress with
    /// `[urgent]`: priority HIGH, or a configured code in the report).
    pub urgent: Option<String>,
    /// Modality and Body Part Examined: kept per study in the studies
    /// table (the priors rules compare them).
    pub modality: Option<String>,
    pub body_part: Option<String>,
    /// Why the ingress holds this result (its digital signature fails, or
    /// it is unsigned where signatures are required).
    pub hold: Option<String>,
}

/// What a report says of itself, as text (the spool does not parse DICOM;
/// the ingress reads these with `kakehashi_dicom::scan::report_facts`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportFacts {
    /// Document title, or the SR's concept name.
    pub title: Option<String>,
    /// The SR's first text: the finding.
    pub text: Option<String>,
    /// When the report was made (Content Date and Time).
    pub made: Option<String>,
    /// The reporting physician (verifying observer or author).
    pub physician: Option<String>,
    /// Coded findings (`SCHEME:VALUE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<String>,
}

/// The patient-identifying part of an urgent notice; stored sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrgentDetails {
    pub patient_id: String,
    #[serde(flatten)]
    pub facts: ReportFacts,
}

/// An urgent result and the communication of its finding (table
/// `urgent`): the six facts of a critical-result communication are the
/// finding and time found and reporting physician (in `details`), the
/// recipients, time delivered and method (in `notices`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrgentEntry {
    /// Its own number, never reused (`kakehashi urgent ack ID`).
    pub id: u64,
    /// The result's spool id (spool ids start again from 1 once a spool has
    /// emptied, so this is not a key).
    pub result_id: u64,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub received_ms: u64,
    /// The calling AE title and address the result came from.
    pub from: String,
    /// [`UrgentDetails`] as JSON, sealed with the spool key (aad: the SOP
    /// Instance UID) when the spool has one.
    pub details: String,
    /// Why it is urgent ("C-STORE priority HIGH", "code SCT:… in the report").
    #[serde(default)]
    pub reason: String,
    pub state: UrgentState,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<Notice>,
    /// The result is held (it matches no study this box relayed): no
    /// notice until the operator releases it; purging it drops this entry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// Failed attempts since the last notice went out.
    pub attempts: u32,
    /// When to notify (again): now for a new one; after `urgent.ack_within`
    /// once notified; after a backoff when the relay failed.
    pub next_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    /// Not an urgent finding: a routine report told to the RIS only
    /// (`[results.hl7]`), until its ACK; never mailed, never escalated,
    /// not in `kakehashi urgent`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub routine: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UrgentState {
    /// Nobody told yet.
    New,
    /// Told; waiting for an acknowledgement.
    Notified,
    /// Not acknowledged in time: told again, the escalation list too.
    Escalated,
    Acknowledged,
}

impl UrgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            UrgentState::New => "new",
            UrgentState::Notified => "notified",
            UrgentState::Escalated => "escalated",
            UrgentState::Acknowledged => "acknowledged",
        }
    }
}

/// One notice that went out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// When the channel accepted it.
    pub time_ms: u64,
    /// `e-mail`.
    pub method: String,
    pub recipients: Vec<String>,
}

/// One spooled instance and its routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: u64,
    #[serde(flatten)]
    pub meta: InstanceMeta,
    /// Bytes of the dataset (what goes on the wire), without the file meta header.
    pub dataset_size: u64,
    /// Offset of the dataset in the payload file (after the Part 10 header).
    pub dataset_offset: u64,
    /// SHA-256 of the dataset bytes, hex. A sealed payload is not hashed
    /// (its seal authenticates it): `none:` and the id, which never equals
    /// another record's; a re-sent copy is then compared byte for byte.
    pub sha256: String,
    pub received_ms: u64,
    pub routes: Vec<Route>,
    /// Bytes of the payload file on disk when that differs from
    /// `dataset_offset + dataset_size` (a sealed payload carries a header
    /// and a tag per chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_size: Option<u64>,
    /// Id (hex) of the spool key that sealed the payload; `None` for a clear
    /// payload, and for payloads sealed before 0.1.1 (the spool's `meta`
    /// then says which key the spool had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Where the payload is in a segment file; `None`: in a file of its own
    /// (`data/<id>.dcm`: payloads too large for a segment, and every payload
    /// written before spool format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<crate::segment::Location>,
}

impl InstanceRecord {
    /// Bytes of the payload file on disk.
    pub fn file_size(&self) -> u64 {
        self.stored_size
            .unwrap_or(self.dataset_offset + self.dataset_size)
    }

    pub fn route(&self, destination: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.destination == destination)
    }

    pub fn route_mut(&mut self, destination: &str) -> Option<&mut Route> {
        self.routes
            .iter_mut()
            .find(|r| r.destination == destination)
    }

    /// The payload (and the Patient ID in the index) are sealed.
    pub fn is_sealed(&self) -> bool {
        self.key_id.is_some() || self.meta.patient_id.starts_with("sealed")
    }

    /// No route still needs the payload (all delivered; dead letters keep it).
    pub fn is_done(&self) -> bool {
        self.routes.iter().all(|r| r.state.is_final())
    }
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub event: AuditEvent,
    /// Who: the calling AE title and address, or "operator", or "kakehashid".
    pub actor: String,
    pub sop_instance_uid: Option<String>,
    pub study_instance_uid: Option<String>,
    pub destination: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditEvent {
    AssociationAccepted,
    AssociationRejected,
    Received,
    Duplicate,
    Refused,
    Delivered,
    DeadLettered,
    Retried,
    Purged,
    /// Still refused with transient statuses after `retry.stuck_after*`:
    /// flagged for the operator (it is still retried).
    Stuck,
    /// A destination behind the tunnel resolved to an address outside it:
    /// nothing was sent there.
    OutsideTunnel,
    /// A pending copy was dropped because a corrected version (same SOP
    /// Instance UID, other bytes) was acknowledged before it was delivered.
    Superseded,
    /// A result matching no study the box relayed: kept, not delivered,
    /// until the operator releases or purges it.
    Held,
    /// The operator released a held result for delivery.
    Released,
    /// Priors of a study were chosen, retrieved, or could not be.
    Prefetch,
    /// An urgent result: received, notified, escalated, a notice that
    /// failed, acknowledged.
    Urgent,
    /// The reading center asked the box to find or retrieve studies in the
    /// hospital's PACS: what was asked, answered, withheld or refused.
    Query,
    /// A routine report told to the RIS (HL7 ORU^R01, `[results.hl7]`):
    /// queued, acknowledged, or failed and retried.
    Report,
}

impl AuditRecord {
    /// A record of `event` by `actor`; the spool assigns `seq` when it is
    /// written. Instance and destination are added with the setters below.
    pub fn new(
        time_ms: u64,
        event: AuditEvent,
        actor: impl Into<String>,
        detail: impl Into<String>,
    ) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_ms,
            event,
            actor: actor.into(),
            sop_instance_uid: None,
            study_instance_uid: None,
            destination: None,
            detail: detail.into(),
        }
    }

    /// About this instance.
    pub fn instance(mut self, meta: &InstanceMeta) -> AuditRecord {
        self.sop_instance_uid = Some(meta.sop_instance_uid.clone());
        self.study_instance_uid = Some(meta.study_instance_uid.clone());
        self
    }

    pub fn sop_instance(mut self, uid: &str) -> AuditRecord {
        self.sop_instance_uid = Some(uid.to_string());
        self
    }

    pub fn destination(mut self, name: &str) -> AuditRecord {
        self.destination = Some(name.to_string());
        self
    }
}

/// Errors decoding a stored value.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error(
        "record format version {0} is newer than this kakehashid understands ({RECORD_VERSION})"
    )]
    TooNew(u8),
    #[error("record is not valid: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Serializing these plain structs to a Vec cannot fail (no maps with
    // non-string keys, no custom serializers).
    serde_json::to_writer(&mut out, value).expect("plain struct serializes");
    out
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&RECORD_VERSION, rest)) => Ok(serde_json::from_slice(rest)?),
        Some((&v, _)) => Err(DecodeError::TooNew(v)),
    }
}
