//! The operator control socket: JSON lines, one request per connection.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use kakehashi_control::{
    QueueEntry, Request, Response, ResultEntry, SpoolStatus, StatusReport, StudyInfo, TunnelStatus,
    UrgentInfo,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::{now_ms, Shared};

/// Binds the socket, replacing a stale one, readable by owner and group only.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create control socket directory {}: {e}",
                dir.display()
            )
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "control socket {} is in use: is another kakehashid running?",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale control socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("cannot restrict control socket {}: {e}", path.display()))?;
    Ok(listener)
}

pub async fn serve(shared: Arc<Shared>, listener: UnixListener, token: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = token.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Err(e) = handle(shared, stream).await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(shared: Arc<Shared>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).take_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let shared2 = Arc::clone(&shared);
            match tokio::task::spawn_blocking(move || answer(&shared2, req)).await {
                Ok(r) => r,
                Err(e) => Response::Error {
                    message: format!("internal error: {e}"),
                },
            }
        }
        Err(e) => Response::Error {
            message: format!("not a valid request: {e}"),
        },
    };
    if let Response::DeadLettered { ids } = &response {
        // Out of the queues of the destinations it is no longer pending for.
        for id in ids {
            let rec = shared.spool.get(*id).ok();
            for f in &shared.forwarders {
                let pending = rec
                    .as_ref()
                    .and_then(|r| r.route(&f.dest.name))
                    .is_some_and(|r| r.state.is_pending());
                if !pending {
                    f.forget(*id);
                }
            }
        }
    }
    if let Response::Retried { ids } | Response::Released { ids } = &response {
        for id in ids {
            if let Ok(rec) = shared.spool.get(*id) {
                for f in &shared.forwarders {
                    f.enqueue(&rec);
                    f.wake();
                }
            }
        }
    }
    let mut out = serde_json::to_vec(&response)
        .unwrap_or_else(|e| format!("{{\"response\":\"error\",\"message\":\"{e}\"}}").into_bytes());
    out.push(b'\n');
    write.write_all(&out).await
}

trait TakeLine {
    async fn take_line(&mut self, line: &mut String) -> std::io::Result<()>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeLine for BufReader<R> {
    async fn take_line(&mut self, line: &mut String) -> std::io::Result<()> {
        // Requests are tiny; a client that sends megabytes is not ours.
        let mut limited = tokio::io::AsyncReadExt::take(self, 64 * 1024);
        limited.read_line(line).await.map(|_| ())
    }
}

fn answer(shared: &Shared, req: Request) -> Response {
    let err = |e: kakehashi_spool::SpoolError| Response::Error {
        message: e.to_string(),
    };
    // Some(error) when the operator named a destination that does not exist.
    let unknown = |d: &Option<String>| match d {
        Some(name) if shared.config.destination(name).is_none() => Some(Response::Error {
            message: format!(
                "no destination named {name:?}; configured: {}",
                shared
                    .config
                    .destinations
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        _ => None,
    };
    match req {
        Request::Status => {
            // O(destinations + studies queued), whatever the backlog: counts
            // come from the forwarders' queues and the spool's dead-letter
            // counters; at most 10 studies per destination are looked up.
            let destinations: Vec<_> = shared
                .forwarders
                .iter()
                .map(|f| {
                    let mut s = f.status(shared.spool.dead_letters(&f.dest.name));
                    s.held = shared.spool.held(&f.dest.name);
                    s.studies = f.studies(10);
                    for p in &mut s.studies {
                        if let Ok(Some(e)) = shared.spool.study(&p.study_instance_uid) {
                            (p.received, p.received_bytes) = (e.instances, e.bytes);
                        }
                    }
                    s
                })
                .collect();
            let free = shared.spool.free_bytes().unwrap_or(0);
            Response::Status(Box::new(StatusReport {
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_s: shared.started.elapsed().as_secs(),
                ae_title: shared.config.dicom.ae_title.to_string(),
                listen: shared.config.dicom.listen.to_string(),
                active_associations: shared
                    .active_associations
                    .load(std::sync::atomic::Ordering::SeqCst),
                spool: SpoolStatus {
                    dir: shared.spool.dir().display().to_string(),
                    used_bytes: shared.spool.used_bytes(),
                    payload_bytes: shared.spool.payload_bytes(),
                    index_bytes: shared.spool.index_bytes(),
                    max_bytes: shared.spool.limits().max_size,
                    free_bytes: free,
                },
                destinations: destinations.clone(),
                tunnel: shared.tunnel_health.as_ref().map(|h| {
                    let h = h.borrow();
                    TunnelStatus {
                        interface: h.interface.clone(),
                        up: h.up,
                        public_key: h.public_key.clone(),
                        peer_public_key: h.peer_public_key.clone(),
                        configured_endpoint: h.configured_endpoint.clone(),
                        endpoint: h.endpoint.map(|e| e.to_string()),
                        last_handshake_age_s: h.last_handshake_age.map(|a| a.as_secs()),
                        handshakes: h.handshakes,
                        rx_bytes: h.rx_bytes,
                        tx_bytes: h.tx_bytes,
                        problem: h.problem.clone(),
                    }
                }),
                urgent_open: shared.config.urgent.as_ref().and_then(|_| {
                    shared
                        .spool
                        .urgent_open()
                        .ok()
                        .map(|u| u.iter().filter(|e| !e.routine).count() as u64)
                }),
                tpm: shared.tpm.clone().map(|mut t| {
                    if t.problem.is_some() {
                        // Everything queued was sealed with the key that is gone.
                        t.undecryptable =
                            Some(destinations.iter().map(|d| d.queued).max().unwrap_or(0));
                    }
                    t
                }),
            }))
        }
        Request::QueueList {
            destination,
            dead_only,
            limit,
        } => {
            if let Some(r) = unknown(&destination) {
                return r;
            }
            let mut entries = Vec::new();
            let mut total = 0u64;
            let limit = limit.unwrap_or(usize::MAX);
            let scanned = shared.spool.for_each_record(|rec| {
                for route in &rec.routes {
                    if destination
                        .as_ref()
                        .is_some_and(|d| *d != route.destination)
                    {
                        continue;
                    }
                    if dead_only && route.state != kakehashi_spool::RouteState::DeadLetter {
                        continue;
                    }
                    if route.state == kakehashi_spool::RouteState::Delivered {
                        continue;
                    }
                    total += 1;
                    if entries.len() >= limit {
                        continue;
                    }
                    entries.push(QueueEntry {
                        id: rec.id,
                        destination: route.destination.clone(),
                        state: route.state,
                        priority: rec.meta.priority,
                        sop_instance_uid: rec.meta.sop_instance_uid.clone(),
                        sop_class_uid: rec.meta.sop_class_uid.clone(),
                        study_instance_uid: rec.meta.study_instance_uid.clone(),
                        patient_id: shared
                            .spool
                            .patient_id(rec)
                            .unwrap_or_else(|| "(sealed)".into()),
                        source_ae: rec.meta.source_ae.clone(),
                        size: rec.dataset_size,
                        received_ms: rec.received_ms,
                        attempts: route.attempts,
                        last_error: route.last_error.clone(),
                        stuck: route.stuck_ms.is_some(),
                    });
                }
            });
            if let Err(e) = scanned {
                return err(e);
            }
            Response::Queue { entries, total }
        }
        Request::QueueRetry { destination, ids } => {
            if let Some(r) = unknown(&destination) {
                return r;
            }
            match shared
                .spool
                .retry_dead(destination.as_deref(), &ids, now_ms())
            {
                Ok(ids) => {
                    tracing::info!(count = ids.len(), "operator requeued dead letters");
                    Response::Retried { ids }
                }
                Err(e) => err(e),
            }
        }
        Request::QueuePurge { destination, ids } => {
            if let Some(r) = unknown(&destination) {
                return r;
            }
            match shared
                .spool
                .purge_dead(destination.as_deref(), &ids, now_ms())
            {
                Ok(ids) => {
                    tracing::warn!(count = ids.len(), "operator purged dead letters");
                    Response::Purged { ids }
                }
                Err(e) => err(e),
            }
        }
        Request::QueueDeadLetter {
            destination,
            ids,
            stuck_only,
        } => {
            if let Some(r) = unknown(&destination) {
                return r;
            }
            match shared.spool.dead_letter_queued(
                destination.as_deref(),
                &ids,
                stuck_only,
                now_ms(),
            ) {
                Ok(ids) => {
                    tracing::warn!(count = ids.len(), "operator dead-lettered queued instances");
                    Response::DeadLettered { ids }
                }
                Err(e) => err(e),
            }
        }
        Request::Studies => {
            let loads: Vec<_> = shared.forwarders.iter().map(|f| f.study_loads()).collect();
            match (shared.spool.studies(), study_progress(&shared.spool)) {
                (Ok(list), Ok(progress)) => Response::Studies {
                    entries: list
                        .into_iter()
                        .map(|(uid, e)| {
                            let p = progress.get(&uid).copied().unwrap_or_default();
                            let (pending, dead_letters) = (p.pending, p.dead_letters);
                            let (on_the_wire, rate_bytes_per_s, eta_s) = study_flow(&loads, &uid);
                            StudyInfo {
                                pending,
                                dead_letters,
                                // Delivered records leave the spool; what is left
                                // of a study is what is not acknowledged yet.
                                acknowledged: e.instances.saturating_sub(pending + dead_letters),
                                pending_bytes: p.pending_bytes,
                                acknowledged_bytes: e
                                    .bytes
                                    .saturating_sub(p.pending_bytes + p.dead_bytes),
                                on_the_wire,
                                rate_bytes_per_s,
                                eta_s: eta_s.filter(|_| pending > 0),
                                complete: e.instances > 0 && pending == 0 && dead_letters == 0,
                                patient_id: e
                                    .patient
                                    .as_deref()
                                    .and_then(|p| shared.spool.open_study_value(&uid, p))
                                    .unwrap_or_else(|| "-".into()),
                                study_instance_uid: uid,
                                role: e.role.as_str().to_string(),
                                instances: e.instances,
                                bytes: e.bytes,
                                first_received_ms: e.first_received_ms,
                                last_received_ms: e.last_received_ms,
                                prefetch: e.prefetch.as_ref().map(|p| {
                                    serde_json::to_value(p.state)
                                        .ok()
                                        .and_then(|v| v.as_str().map(String::from))
                                        .unwrap_or_default()
                                }),
                                priors: e
                                    .prefetch
                                    .as_ref()
                                    .map(|p| p.priors.clone())
                                    .unwrap_or_default(),
                                detail: e.prefetch.and_then(|p| p.detail),
                            }
                        })
                        .collect(),
                },
                (Err(e), _) | (_, Err(e)) => err(e),
            }
        }
        Request::Urgent => match shared.spool.urgent() {
            Ok(list) => Response::Urgent {
                entries: list
                    .iter()
                    .filter(|e| !e.routine)
                    .map(|e| urgent_info(&shared.spool, e))
                    .collect(),
            },
            Err(e) => err(e),
        },
        Request::UrgentAck { id, by } => {
            let who = by
                .map(|b| {
                    b.chars()
                        .filter(|c| !c.is_control())
                        .take(200)
                        .collect::<String>()
                })
                .filter(|b| !b.trim().is_empty());
            let actor = match &who {
                Some(w) => format!("operator ({w})"),
                None => "operator".to_string(),
            };
            match shared.spool.update_urgent(id, &actor, crate::now_ms(), |e| {
                if e.state == kakehashi_spool::UrgentState::Acknowledged {
                    return Err(format!("urgent finding {id} was already acknowledged"));
                }
                e.state = kakehashi_spool::UrgentState::Acknowledged;
                e.acknowledged_ms = Some(crate::now_ms());
                e.acknowledged_by = Some(actor.clone());
                Ok(format!(
                    "urgent finding {id} acknowledged by {actor} after {} notice(s); no more notices",
                    e.notices.len()
                ))
            }) {
                Ok(e) => {
                    tracing::info!(id, by = %actor, "urgent finding acknowledged");
                    Response::Urgent {
                        entries: vec![urgent_info(&shared.spool, &e)],
                    }
                }
                Err(kakehashi_spool::SpoolError::NotFound(_)) => Response::Error {
                    message: format!("no urgent finding {id} (see `kakehashi urgent`)"),
                },
                Err(e) => err(e),
            }
        }
        Request::Results => {
            let mut entries = Vec::new();
            let scanned = shared.spool.for_each_record(|rec| {
                if rec.meta.role != kakehashi_spool::Role::Result {
                    return;
                }
                for route in rec.routes.iter().filter(|r| !r.state.is_final()) {
                    entries.push(ResultEntry {
                        id: rec.id,
                        state: route.state,
                        priority: rec.meta.priority,
                        amendment: rec.meta.amendment,
                        sop_class_uid: rec.meta.sop_class_uid.clone(),
                        sop_instance_uid: rec.meta.sop_instance_uid.clone(),
                        study_instance_uid: rec.meta.study_instance_uid.clone(),
                        patient_id: shared
                            .spool
                            .patient_id(rec)
                            .unwrap_or_else(|| "(sealed)".into()),
                        source_ae: rec.meta.source_ae.clone(),
                        source_ip: rec.meta.source_ip.clone(),
                        size: rec.dataset_size,
                        received_ms: rec.received_ms,
                        attempts: route.attempts,
                        reason: route.last_error.clone(),
                    });
                }
            });
            match scanned {
                Ok(()) => Response::Results { entries },
                Err(e) => err(e),
            }
        }
        Request::ResultsRelease { ids } => match shared.spool.release_held(&ids, now_ms()) {
            Ok(ids) => {
                tracing::warn!(
                    count = ids.len(),
                    "operator released held results for delivery"
                );
                Response::Released { ids }
            }
            Err(e) => err(e),
        },
        Request::ResultsPurge { ids } => {
            if ids.is_empty() {
                return Response::Error {
                    message:
                        "name the held results to purge by id (`kakehashi results` lists them)"
                            .into(),
                };
            }
            match shared.spool.purge_held(&ids, now_ms()) {
                Ok(ids) => {
                    tracing::warn!(count = ids.len(), "operator purged held results");
                    Response::Purged { ids }
                }
                Err(e) => err(e),
            }
        }
        Request::Audit { after, limit } => {
            match shared.spool.audit_since(after, limit.clamp(1, 10_000)) {
                Ok(records) => Response::Audit { records },
                Err(e) => err(e),
            }
        }
    }
}

/// Per study (hospital and prior instances only): how many of its
/// instances still wait for a destination, and how many are dead-lettered.
/// One pass over the spool's records: an operator command, not a hot path.
/// What the spool still holds of a study.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    pending: u64,
    pending_bytes: u64,
    dead_letters: u64,
    dead_bytes: u64,
}

fn study_progress(
    spool: &kakehashi_spool::Spool,
) -> Result<std::collections::HashMap<String, Held>, kakehashi_spool::SpoolError> {
    use kakehashi_spool::{Role, RouteState};
    let mut by_study: std::collections::HashMap<String, Held> = Default::default();
    spool.for_each_record(|rec| {
        if rec.meta.role == Role::Result {
            return;
        }
        let slot = by_study
            .entry(rec.meta.study_instance_uid.clone())
            .or_default();
        if rec.routes.iter().any(|r| r.state == RouteState::DeadLetter) {
            slot.dead_letters += 1;
            slot.dead_bytes += rec.dataset_size;
        } else if rec.routes.iter().any(|r| !r.state.is_final()) {
            slot.pending += 1;
            slot.pending_bytes += rec.dataset_size;
        }
    })?;
    Ok(by_study)
}

/// Of `study`, over every destination: instances on the wire, bytes
/// acknowledged per second, and when the slowest destination will have
/// it all (`None` while one with bytes queued has no rate yet).
fn study_flow(
    loads: &[std::collections::HashMap<String, crate::forwarder::StudyFlow>],
    study: &str,
) -> (u64, Option<u64>, Option<u64>) {
    let mut wire = 0;
    let mut rate: Option<u64> = None;
    let mut eta = None;
    for (i, f) in loads.iter().filter_map(|l| l.get(study)).enumerate() {
        if i == 0 {
            eta = Some(0);
        }
        wire += f.on_the_wire;
        if let Some(r) = f.rate {
            rate = Some(rate.unwrap_or(0) + r);
        }
        eta = match (eta, f.rate) {
            (Some(e), Some(r)) => Some(e.max(f.queued_bytes.div_ceil(r))),
            _ if f.queued_bytes == 0 => eta,
            _ => None,
        };
    }
    (wire, rate, eta)
}

fn urgent_info(spool: &kakehashi_spool::Spool, e: &kakehashi_spool::UrgentEntry) -> UrgentInfo {
    let d = spool.urgent_details(e);
    let facts = d.as_ref().map(|d| &d.facts);
    let finding = match (
        facts.and_then(|f| f.title.as_deref()),
        facts.and_then(|f| f.text.as_deref()),
    ) {
        (Some(t), Some(x)) => format!("{t}: {x}"),
        (Some(t), None) => t.to_string(),
        (None, Some(x)) => x.to_string(),
        (None, None) => "-".to_string(),
    };
    UrgentInfo {
        id: e.id,
        result_id: e.result_id,
        held: e.held,
        state: e.state,
        reason: e.reason.clone(),
        patient_id: d
            .as_ref()
            .map(|d| d.patient_id.clone())
            .unwrap_or_else(|| "(sealed with another key)".into()),
        finding,
        made: facts.and_then(|f| f.made.clone()),
        physician: facts.and_then(|f| f.physician.clone()),
        study_instance_uid: e.study_instance_uid.clone(),
        sop_instance_uid: e.sop_instance_uid.clone(),
        from: e.from.clone(),
        received_ms: e.received_ms,
        notices: e.notices.clone(),
        next_ms: e.next_ms,
        last_error: e.last_error.clone(),
        acknowledged_ms: e.acknowledged_ms,
        acknowledged_by: e.acknowledged_by.clone(),
    }
}
