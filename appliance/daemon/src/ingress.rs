//! The DICOM SCPs: the one the hospital sends to (`[dicom]`), and the one
//! the reading center sends its results back to (`[results]`, when set).
//! Both run this code; [`Kind`] says which policy, role and priority rules
//! apply.
//!
//! Each association runs in its own task. P-DATA fragments go, as they
//! arrive, through a bounded channel to a blocking writer that appends them
//! to the spool file; the C-STORE-RSP is sent only after the spool commit
//! (fsync + index) returns. A malformed PDU ends that connection, with a log
//! line, and nothing else.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, Pdu};
use kakehashi_dicom::dimse::status;
use kakehashi_dicom::negotiate::{self, AddressMatch, Policy, SourceRule};
use kakehashi_dicom::scp::{Action, Scp, StoreRequest};
use kakehashi_dicom::{part10, wire};
use kakehashi_spool::{
    Accepted, AuditEvent, AuditRecord, InstanceMeta, Priority, Role, SpoolError,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::{now_ms, rejections, Shared};

#[derive(Debug)]
struct Cidr(kakehashi_config::IpNet);

impl AddressMatch for Cidr {
    fn matches(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains(ip)
    }
}

/// The box itself: loopback, or the address its listener is bound to.
#[derive(Debug)]
struct ThisBox(std::net::IpAddr);

impl AddressMatch for ThisBox {
    fn matches(&self, ip: std::net::IpAddr) -> bool {
        ip.is_loopback() || ip == self.0
    }
}

/// The networks behind the tunnel's peer: with a `[tunnel]`, results are
/// taken only from there (WireGuard authenticated the packets as the
/// center's).
#[derive(Debug)]
struct ThroughTunnel(Vec<kakehashi_config::IpNet>);

impl AddressMatch for ThroughTunnel {
    fn matches(&self, ip: std::net::IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }
}

/// Which SCP a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[dicom]`: studies from the hospital, every storage SOP class.
    Hospital,
    /// `[results]`: reports from the reading center, only the result
    /// classes; delivered to `[pacs]`.
    Results,
}

impl Kind {
    fn role(self) -> Role {
        match self {
            Kind::Hospital => Role::Current,
            Kind::Results => Role::Result,
        }
    }

    fn policy(self, config: &kakehashi_config::Config) -> Policy {
        match (self, &config.results) {
            (Kind::Results, Some(r)) => Policy {
                ae_title: r.ae_title.to_string(),
                sources: r
                    .from
                    .iter()
                    .map(|t| SourceRule {
                        ae_title: t.to_string(),
                        address: config.tunnel.as_ref().map(|tun| {
                            Box::new(ThroughTunnel(tun.peer.allowed_ips.clone()))
                                as Box<dyn AddressMatch>
                        }),
                    })
                    .collect(),
                max_pdu: config.dicom.max_pdu,
                sources_key: "results.from",
                storage_classes: Some(r.sop_classes.clone()),
                query_retrieve: r.queries,
            },
            _ => Policy {
                ae_title: config.dicom.ae_title.to_string(),
                sources: config
                    .dicom
                    .sources
                    .iter()
                    .map(|s| SourceRule {
                        ae_title: s.ae_title.to_string(),
                        address: s
                            .address
                            .map(|a| Box::new(Cidr(a)) as Box<dyn AddressMatch>),
                    })
                    // The box's own AE title from the box itself: the boot's
                    // health check (`kakehashi appliance health`) proves
                    // the DICOM port answers with a C-ECHO.
                    .chain(std::iter::once(SourceRule {
                        ae_title: config.dicom.ae_title.to_string(),
                        address: Some(Box::new(ThisBox(config.dicom.listen.ip()))),
                    }))
                    .collect(),
                max_pdu: config.dicom.max_pdu,
                sources_key: "dicom.sources",
                storage_classes: None,
                query_retrieve: false,
            },
        }
    }
}

pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    token: CancellationToken,
    kind: Kind,
) {
    let policy = Arc::new(kind.policy(&shared.config));
    let mut conns = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(std::time::Duration::from_millis(rejections::WINDOW_MS));
    let mut refused_connections = 0u64;
    // Connections that have not yet associated (each cancels itself from
    // here when its first PDU is in).
    let waiting: std::sync::Mutex<Vec<CancellationToken>> = Default::default();
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = sweep.tick() => {
                // Counted repeats of rejections, written when their window closes.
                let closed = shared.rejections().close_windows(now_ms());
                for e in closed {
                    audit(&shared, AuditEvent::AssociationRejected, e.actor, e.detail).await;
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                // Connections that have not yet said who they are: bounded.
                // At the bound the oldest of them goes (a real sender sends
                // its A-ASSOCIATE-RQ at once, so a flood of silent
                // connections cannot lock senders out).
                let this = CancellationToken::new();
                let evicted = {
                    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
                    waiting.retain(|t: &CancellationToken| !t.is_cancelled());
                    let evicted = (waiting.len() >= MAX_WAITING).then(|| waiting.remove(0));
                    waiting.push(this.clone());
                    evicted
                };
                if let Some(oldest) = evicted {
                    oldest.cancel();
                    refused_connections += 1;
                    if refused_connections.is_power_of_two() {
                        tracing::warn!(%peer, evicted = refused_connections, "{MAX_WAITING} connections waiting to associate: the oldest was closed");
                    }
                }
                let shared = Arc::clone(&shared);
                let policy = Arc::clone(&policy);
                let token = token.clone();
                conns.spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = association(shared, policy, stream, peer, this, kind) => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!("accepting a DICOM connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    conns.shutdown().await;
}

/// Connections waiting to associate at once, at most 64 KiB each.
const MAX_WAITING: usize = 32;

/// Until an A-ASSOCIATE-RQ arrives the peer is unknown: it gets this long
/// (DICOM's ARTIM timer, usually 30 s; far less than `idle_timeout`).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest first PDU accepted (an A-ASSOCIATE-RQ with 128 presentation
/// contexts and user identity is far below this).
const MAX_REQUEST: u32 = 64 * 1024;

/// Decrements the active-association count however the task ends.
struct Active<'a>(&'a Shared);
impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active_associations.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn audit(shared: &Shared, event: AuditEvent, actor: String, detail: String) {
    let spool = Arc::clone(&shared.spool);
    let rec = AuditRecord::new(now_ms(), event, actor, detail);
    match tokio::task::spawn_blocking(move || spool.audit(rec)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("cannot write the audit record: {e}"),
        Err(e) => tracing::error!("audit task failed: {e}"),
    }
}

async fn association(
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    mut stream: TcpStream,
    peer: SocketAddr,
    waiting: CancellationToken,
    kind: Kind,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::new();
    let read = tokio::select! {
        r = timeout(REQUEST_TIMEOUT, wire::read_first_pdu(&mut stream, &mut buf, MAX_REQUEST)) => r,
        _ = waiting.cancelled() => {
            tracing::warn!(%peer, "closed before it associated: too many connections waiting to associate");
            return;
        }
    };
    // No longer waiting: out of the eviction list.
    waiting.cancel();
    let first = match read {
        Err(_) => {
            tracing::warn!(%peer, "no A-ASSOCIATE-RQ within {REQUEST_TIMEOUT:?}; closed");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, "dropped connection before association: {e}");
            return;
        }
        Ok(Ok(p)) => p,
    };
    let Pdu::AssociationRQ(rq) = first else {
        tracing::warn!(%peer, "dropped connection: expected A-ASSOCIATE-RQ, got {}", first.short_description());
        let _ = wire::write_pdu(
            &mut stream,
            &abort(AbortRQServiceProviderReason::UnexpectedPdu),
        )
        .await;
        return;
    };
    let calling = rq.calling_ae_title.trim().to_string();
    let active = shared.active_associations.fetch_add(1, Ordering::SeqCst);
    let _guard = Active(&shared);
    let keys_down = shared.keys_problem().is_some();
    let decision = negotiate::negotiate(
        &rq,
        peer.ip(),
        &policy,
        keys_down || active >= shared.config.dicom.max_associations,
    );
    let accepted = match decision {
        Err(mut rej) => {
            if keys_down && rej.rj.result == dicom_ul::pdu::AssociationRJResult::Transient {
                rej.reason = "the box's keys are unavailable (see `kakehashi status`); it accepts nothing until they are".into();
            }
            tracing::warn!(%peer, calling_ae = %calling, called_ae = %rq.called_ae_title.trim(), "association rejected: {}", rej.reason);
            let _ = wire::write_pdu(&mut stream, &Pdu::AssociationRJ(rej.rj)).await;
            // Repeats within a minute are counted, not each written.
            let first = shared.rejections().reject(
                now_ms(),
                &format!("{calling}@{}", peer.ip()),
                &rej.reason,
            );
            if let Some(e) = first {
                audit(&shared, AuditEvent::AssociationRejected, e.actor, e.detail).await;
            }
            return;
        }
        Ok(a) => a,
    };
    if let Err(e) = wire::write_pdu(&mut stream, &Pdu::AssociationAC(accepted.ac.clone())).await {
        tracing::warn!(%peer, "cannot answer association: {e}");
        return;
    }
    tracing::info!(%peer, calling_ae = %calling, contexts = accepted.contexts.len(), "association accepted");
    audit(
        &shared,
        AuditEvent::AssociationAccepted,
        format!("{calling}@{}", peer.ip()),
        format!(
            "{} presentation context(s) accepted",
            accepted.contexts.len()
        ),
    )
    .await;

    let high_priority = kind == Kind::Hospital
        && shared.config.dicom.sources.iter().any(|s| {
            s.high_priority
                && s.ae_title.as_str() == calling
                && s.address.is_none_or(|a| a.contains(peer.ip()))
        });
    let mut session = Session {
        shared: &shared,
        peer,
        calling,
        scp: Scp::new(accepted.contexts),
        peer_max_pdu: accepted.peer_max_pdu,
        receiving: None,
        stored: 0,
        high_priority,
        role: kind.role(),
    };
    let outcome = session.run(&mut stream, &mut buf).await;
    match outcome {
        Ok(()) => {
            tracing::info!(%peer, calling_ae = %session.calling, stored = session.stored, "association released")
        }
        Err(e) => {
            tracing::warn!(%peer, calling_ae = %session.calling, stored = session.stored, "association ended: {e}");
            if e.send_abort {
                let _ = wire::write_pdu(
                    &mut stream,
                    &abort(AbortRQServiceProviderReason::UnexpectedPdu),
                )
                .await;
            }
        }
    }
}

fn abort(reason: AbortRQServiceProviderReason) -> Pdu {
    Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    }
}

#[derive(Debug)]
struct SessionError {
    message: String,
    send_abort: bool,
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn protocol(message: impl Into<String>) -> SessionError {
    SessionError {
        message: message.into(),
        send_abort: true,
    }
}

fn gone(message: impl Into<String>) -> SessionError {
    SessionError {
        message: message.into(),
        send_abort: false,
    }
}

enum Chunk {
    Data(bytes::Bytes),
    Finish(Box<InstanceMeta>),
}

/// An instance on its way to disk.
struct Receiving {
    request: StoreRequest,
    tx: mpsc::Sender<Chunk>,
    writer: tokio::task::JoinHandle<Result<Accepted, SpoolError>>,
    /// A result's whole dataset, to verify its signatures (None beyond
    /// [`MAX_VERIFIED_RESULT`]).
    whole: Option<Vec<u8>>,
}

/// Largest result whose digital signatures the box verifies (reports are
/// kilobytes; an encapsulated PDF a few megabytes). A larger signed result
/// is held, saying so.
const MAX_VERIFIED_RESULT: usize = 64 << 20;

/// Drives one association's [`Scp`] state machine: reads PDUs, carries out
/// its actions (socket writes, the spool writer), feeds back store outcomes.
struct Session<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    calling: String,
    scp: Scp,
    /// Largest PDU the peer takes (for C-FIND answers).
    peer_max_pdu: u32,
    receiving: Option<Receiving>,
    stored: u64,
    /// The source is configured `priority = "high"`.
    high_priority: bool,
    role: Role,
}

impl Session<'_> {
    async fn run(
        &mut self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let idle = self.shared.config.dicom.idle_timeout;
        loop {
            let frame = timeout(
                idle,
                wire::read_frame(stream, buf, self.shared.config.dicom.max_pdu),
            )
            .await
            .map_err(|_| protocol(format!("no PDU for {idle:?} (dicom.idle_timeout)")))?
            .map_err(|e| match e {
                wire::WireError::Closed => gone("peer closed the connection without releasing"),
                other => protocol(other.to_string()),
            })?;
            let actions = match frame {
                wire::Frame::PData(values) => {
                    for v in values {
                        let actions = self.scp.on_pdv(v);
                        if self.perform(stream, actions).await? {
                            return Ok(());
                        }
                    }
                    continue;
                }
                wire::Frame::Other(Pdu::ReleaseRQ) => self.scp.on_release(),
                wire::Frame::Other(Pdu::AbortRQ { .. }) => return Err(gone("peer aborted the association (an instance in transfer is discarded, it was never acknowledged)")),
                wire::Frame::Other(other) => {
                    return Err(protocol(format!("unexpected {}", other.short_description())))
                }
            };
            if self.perform(stream, actions).await? {
                return Ok(());
            }
        }
    }

    /// Carries out `actions` in order; `true` once the association is released.
    async fn perform(
        &mut self,
        stream: &mut TcpStream,
        actions: Vec<Action>,
    ) -> Result<bool, SessionError> {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Command { pc, bytes } => wire::send_command(stream, pc, &bytes)
                    .await
                    .map_err(|e| gone(e.to_string()))?,
                Action::StoreBegin(request) => {
                    let header = part10::file_meta(
                        &request.context.abstract_syntax,
                        &request.sop_instance,
                        &request.context.transfer_syntax,
                        &self.calling,
                    );
                    let (tx, rx) = mpsc::channel(8);
                    let spool = Arc::clone(&self.shared.spool);
                    let uid = request.sop_instance.clone();
                    let writer = tokio::task::spawn_blocking(move || {
                        write_instance(&spool, &header, &uid, rx)
                    });
                    self.receiving = Some(Receiving {
                        request,
                        tx,
                        writer,
                        whole: (self.role == Role::Result).then(Vec::new),
                    });
                }
                Action::StoreData(data) => {
                    if let Some(r) = &mut self.receiving {
                        if let Some(w) = &mut r.whole {
                            if w.len() + data.len() <= MAX_VERIFIED_RESULT {
                                w.extend_from_slice(&data);
                            } else {
                                r.whole = None;
                            }
                        }
                        // A closed channel means the writer already failed;
                        // its error comes out at the end.
                        let _ = r.tx.send(Chunk::Data(data)).await;
                    }
                }
                Action::StoreEnd { keys, report } => {
                    let (code, comment) = self.commit(keys, report).await;
                    queue.extend(self.scp.stored(code, comment.as_deref()));
                }
                Action::Refused {
                    sop_instance,
                    status,
                    comment,
                } => {
                    tracing::warn!(peer = %self.peer, calling_ae = %self.calling, %sop_instance, status = format!("0x{status:04X}"), "instance refused: {comment}");
                    self.refusal_audit(&sop_instance, status, &comment).await;
                }
                Action::Query(q) => {
                    let who = crate::ondemand::Asker {
                        shared: self.shared,
                        calling: &self.calling,
                        peer: self.peer,
                        peer_max_pdu: self.peer_max_pdu,
                    };
                    crate::ondemand::answer(&who, stream, q)
                        .await
                        .map_err(|e| gone(e.to_string()))?;
                    self.scp.answered();
                }
                Action::Release => {
                    let _ = wire::write_pdu(stream, &Pdu::ReleaseRP).await;
                    return Ok(true);
                }
                Action::Abort(why) => return Err(protocol(why)),
            }
        }
        Ok(false)
    }

    /// Finishes the instance being received; the status to answer with.
    async fn commit(
        &mut self,
        keys: kakehashi_dicom::scan::RoutingKeys,
        report: Option<Box<kakehashi_dicom::scan::ReportFacts>>,
    ) -> (u16, Option<String>) {
        let Some(mut r) = self.receiving.take() else {
            return (
                status::PROCESSING_FAILURE,
                Some("Kakehashi: internal error (no instance in transfer)".into()),
            );
        };
        let request = &r.request;
        // A C-STORE caused by our own C-MOVE: a prior study, or one the
        // center asked for (`ondemand`).
        let prior_of = match (&request.move_originator, &self.shared.config.pacs) {
            (Some(orig), Some(p))
                if self.role == Role::Current
                    && (self.shared.config.priors.is_some()
                        || self
                            .shared
                            .config
                            .results
                            .as_ref()
                            .is_some_and(|r| r.queries))
                    && p.calling_ae_title.as_str() == orig =>
            {
                Some(request.move_originator_id.unwrap_or(0))
            }
            _ => None,
        };
        let role = if prior_of.is_some() {
            Role::Prior
        } else {
            self.role
        };
        let meta = InstanceMeta {
            sop_class_uid: request.context.abstract_syntax.clone(),
            sop_instance_uid: request.sop_instance.clone(),
            transfer_syntax_uid: request.context.transfer_syntax.clone(),
            study_instance_uid: keys.study_instance_uid.unwrap_or_default(),
            patient_id: keys.patient_id.unwrap_or_default(),
            source_ae: self.calling.clone(),
            source_ip: self.peer.ip().to_string(),
            priority: if prior_of.is_some() {
                // Priors go after every current study.
                Priority::Low
            } else if self.high_priority {
                Priority::High
            } else {
                Priority::from_dimse(request.priority)
            },
            role,
            amendment: self.role == Role::Result && keys.has_predecessors,
            arrival: kakehashi_spool::Arrival {
                accession_number: keys.accession_number,
                issuer: keys.issuer_of_patient_id,
                via: match prior_of {
                    Some(id) => Some(format!("retrieved by our C-MOVE (message ID {id})")),
                    None => self.via(),
                },
                report: report.filter(|_| role == Role::Result).map(|f| {
                    kakehashi_spool::ReportFacts {
                        codes: f.codes,
                        title: f.title,
                        text: f.text,
                        made: match (f.content_date, f.content_time) {
                            (Some(d), Some(t)) => Some(format!("{d} {t}")),
                            (d, t) => d.or(t),
                        },
                        physician: f.observer,
                    }
                }),
                urgent: None,
                modality: keys.modality,
                body_part: keys.body_part,
                hold: None,
            },
        };
        let mut meta = meta;
        if let (Role::Result, Some(u)) = (role, &self.shared.config.urgent) {
            let coded = meta
                .arrival
                .report
                .as_ref()
                .and_then(|f| f.codes.iter().find(|c| u.codes.contains(c)).cloned());
            meta.arrival.urgent = match (meta.priority, coded) {
                (Priority::High, _) => Some("C-STORE priority HIGH".to_string()),
                (_, Some(code)) => {
                    // An urgent finding goes first to the PACS as well.
                    meta.priority = Priority::High;
                    Some(format!("code {code} in the report"))
                }
                _ => None,
            };
        }
        if role == Role::Result {
            let (hold, signed) = self.check_signatures(r.whole.take(), &r.request).await;
            meta.arrival.hold = hold;
            if let Some(signed) = signed {
                meta.arrival.via = Some(format!(
                    "{}, {signed}",
                    meta.arrival.via.as_deref().unwrap_or("origin unknown")
                ));
            }
        }
        let _ = r.tx.send(Chunk::Finish(Box::new(meta))).await;
        drop(r.tx);
        let uid = &request.sop_instance;
        match r.writer.await {
            Ok(Ok(Accepted::Queued { record, superseded })) => {
                self.stored += 1;
                use std::sync::atomic::Ordering::Relaxed;
                self.shared.received.fetch_add(1, Relaxed);
                self.shared
                    .received_bytes
                    .fetch_add(record.dataset_size, Relaxed);
                tracing::debug!(id = record.id, sop_instance = %uid, bytes = record.dataset_size, "instance spooled");
                if record.meta.role == Role::Result {
                    let held = record
                        .routes
                        .iter()
                        .find(|r| r.state == kakehashi_spool::RouteState::Held);
                    match held {
                        Some(r) => {
                            tracing::warn!(id = record.id, sop_instance = %uid, calling_ae = %self.calling, "result held: {}", r.last_error.as_deref().unwrap_or(""))
                        }
                        None => {
                            tracing::info!(id = record.id, sop_instance = %uid, calling_ae = %self.calling, amendment = record.meta.amendment, "result accepted for the hospital's PACS")
                        }
                    }
                }
                if let Some(old) = superseded {
                    tracing::info!(sop_instance = %uid, old, new = record.id, "a corrected version replaces the queued copy, which will not be sent");
                }
                for f in &self.shared.forwarders {
                    if let Some(old) = superseded {
                        f.forget(old);
                    }
                    f.enqueue(&record);
                }
                (status::SUCCESS, None)
            }
            Ok(Ok(Accepted::Duplicate { existing })) => {
                tracing::info!(sop_instance = %uid, existing, "duplicate of a spooled instance acknowledged, not queued twice");
                (status::SUCCESS, None)
            }
            Ok(Err(e)) if e.is_out_of_space() => {
                tracing::warn!(peer = %self.peer, calling_ae = %self.calling, sop_instance = %uid, "answering 0xA700: {e}");
                let c = format!("Kakehashi: {e}");
                self.refusal_audit(uid, status::OUT_OF_RESOURCES, &c).await;
                (status::OUT_OF_RESOURCES, Some(c))
            }
            Ok(Err(e)) => {
                tracing::error!(peer = %self.peer, sop_instance = %uid, "cannot spool instance, answering 0x0110: {e}");
                let c = format!("Kakehashi: {e}");
                self.refusal_audit(uid, status::PROCESSING_FAILURE, &c)
                    .await;
                (status::PROCESSING_FAILURE, Some(c))
            }
            Err(e) => {
                tracing::error!(sop_instance = %uid, "spool writer task failed: {e}");
                (
                    status::PROCESSING_FAILURE,
                    Some("Kakehashi: internal error".into()),
                )
            }
        }
    }

    /// A result's DICOM digital signatures (PS3.15): why to hold it, or
    /// what verified (for its `received` audit record).
    async fn check_signatures(
        &self,
        whole: Option<Vec<u8>>,
        request: &StoreRequest,
    ) -> (Option<String>, Option<String>) {
        let Some(whole) = whole else {
            return (
                Some(format!(
                    "larger than {} MiB: its digital signatures (if any) are not verified by this box",
                    MAX_VERIFIED_RESULT >> 20
                )),
                None,
            );
        };
        let ts = request.context.transfer_syntax.clone();
        let signers = self.shared.signers.clone();
        let verdict = tokio::task::spawn_blocking(move || {
            kakehashi_dicom::signature::verify(&ts, &whole, &signers)
        })
        .await
        .unwrap_or_else(|e| {
            Err(kakehashi_dicom::signature::SignatureError(format!(
                "verification failed internally: {e}"
            )))
        });
        let require = self
            .shared
            .config
            .results
            .as_ref()
            .is_some_and(|c| c.require_signature);
        match verdict {
            Ok(signed) if signed.is_empty() && require => (
                Some("not signed, and results.require_signature is set".to_string()),
                None,
            ),
            Ok(signed) if signed.is_empty() => (None, None),
            Ok(signed) => (
                None,
                Some(
                    signed
                        .iter()
                        .map(|s| {
                            format!(
                                "DICOM signature verified ({}, signer {}, signed {})",
                                s.algorithm, s.signer, s.datetime
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ),
            Err(e) => (
                Some(format!("its DICOM digital signature fails: {e}")),
                None,
            ),
        }
    }

    /// For a result: whether it came through the tunnel, and from which
    /// WireGuard peer (recorded in its `received` audit record).
    fn via(&self) -> Option<String> {
        if self.role != Role::Result {
            return None;
        }
        Some(match &self.shared.config.tunnel {
            Some(t) if t.routes(self.peer.ip()) => format!(
                "through the tunnel from WireGuard peer {}",
                kakehashi_tunnel::key::encode(&t.peer.public_key)
            ),
            _ => "not through the tunnel".to_string(),
        })
    }

    async fn refusal_audit(&self, sop_instance: &str, code: u16, comment: &str) {
        let spool = Arc::clone(&self.shared.spool);
        let rec = AuditRecord::new(
            now_ms(),
            AuditEvent::Refused,
            format!("{}@{}", self.calling, self.peer.ip()),
            format!("0x{code:04X}: {comment}"),
        )
        .sop_instance(sop_instance);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || spool.audit(rec)).await {
            tracing::error!("cannot write the audit record: {e}");
        }
    }
}

/// Runs on a blocking thread: appends fragments, then commits. On the first
/// write error it keeps draining (the sender is still sending) and reports
/// the error at the end.
fn write_instance(
    spool: &Arc<kakehashi_spool::Spool>,
    header: &[u8],
    sop_instance_uid: &str,
    mut rx: mpsc::Receiver<Chunk>,
) -> Result<Accepted, SpoolError> {
    // Err holds the first failure; the partial file is dropped at once so its
    // reservation stops counting against the spool.
    let mut incoming = spool.begin(header, sop_instance_uid);
    while let Some(chunk) = rx.blocking_recv() {
        match chunk {
            Chunk::Data(d) => {
                if let Ok(inc) = incoming.as_mut() {
                    if let Err(e) = inc.write(&d) {
                        incoming = Err(e);
                    }
                }
            }
            Chunk::Finish(meta) => return incoming?.commit(*meta, now_ms()),
        }
    }
    Err(SpoolError::Io {
        path: spool.dir().to_path_buf(),
        source: std::io::Error::other("association ended before the dataset was complete"),
    })
}
