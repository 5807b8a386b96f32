//! The center asks for more: C-FIND and C-MOVE from a `results.from` AE on
//! the results port (with `results.queries`, the default).
//!
//! The center never reaches the hospital's PACS. The box asks `[pacs]`
//! itself, as it does for priors, and answers only for patients it relayed
//! a study of ([`kakehashi_spool::Spool::relayed_patient`]): a C-FIND's
//! answers about other patients are withheld, a C-MOVE of another patient's
//! study is refused. A C-MOVE is carried out as the box's own C-MOVE to
//! itself: the instances enter the spool as priors (after every current
//! study) and reach the destinations through it, durable and retried like
//! everything else; the center's C-MOVE-RSP counts what the spool accepted.
//! Each request is one `query` audit record: who asked, what, and what was
//! answered, withheld or refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use kakehashi_dicom::dimse;
use kakehashi_dicom::query::{
    self, tag, Identifier, SubOperations, STUDY_ROOT_FIND, STUDY_ROOT_MOVE,
};
use kakehashi_dicom::scp::QueryRequest;
use kakehashi_dicom::scu::Scu;
use kakehashi_dicom::uids::IMPLICIT_VR_LE;
use kakehashi_dicom::wire;
use kakehashi_spool::{AuditEvent, AuditRecord};
use tokio::net::TcpStream;

use crate::{now_ms, Shared};

/// Unable to process (PS3.4 C.4.1.1.4 / C.4.2.1.5).
const UNABLE: u16 = 0xC000;
/// Identifier does not match SOP Class.
const BAD_IDENTIFIER: u16 = 0xA900;
/// Move Destination unknown.
const UNKNOWN_DESTINATION: u16 = 0xA801;
/// Sub-operations complete, one or more failures or warnings.
const SOME_FAILED: u16 = 0xB000;

/// Who asked, for the answers and the audit trail.
pub struct Asker<'a> {
    pub shared: &'a Shared,
    pub calling: &'a str,
    pub peer: SocketAddr,
    pub peer_max_pdu: u32,
}

/// Answers `q` on `stream`; an error is a broken connection.
pub async fn answer(
    who: &Asker<'_>,
    stream: &mut TcpStream,
    q: QueryRequest,
) -> Result<(), wire::WireError> {
    let find = q.move_destination.is_none();
    let (what, outcome) = match Identifier::decode(&q.identifier) {
        None => (
            "an unreadable identifier".to_string(),
            Err((
                BAD_IDENTIFIER,
                "the identifier is not an implicit VR little endian dataset".to_string(),
            )),
        ),
        Some(id) => {
            let what = describe(&q, &id);
            let outcome = match check(&id) {
                Err(e) => Err(e),
                Ok(()) if find => self::find(who, stream, &q).await?,
                Ok(()) => retrieve(who, &q, &id).await,
            };
            (what, outcome)
        }
    };
    let (status, detail, ops) = match outcome {
        Ok(Done {
            status,
            detail,
            ops,
        }) => (status, detail, ops),
        Err((status, why)) => (status, format!("refused: {why}"), SubOperations::default()),
    };
    let comment = (status != 0).then(|| detail.clone());
    let rsp = if find {
        dimse::c_find_rsp(
            q.message_id,
            STUDY_ROOT_FIND,
            status,
            false,
            comment.as_deref(),
        )
    } else {
        dimse::c_move_rsp(
            q.message_id,
            STUDY_ROOT_MOVE,
            status,
            ops,
            comment.as_deref(),
        )
    };
    wire::send_command(stream, q.context.id, &rsp).await?;
    if status == 0 {
        tracing::info!(peer = %who.peer, calling_ae = who.calling, "{what}: {detail}");
    } else {
        tracing::warn!(peer = %who.peer, calling_ae = who.calling, status = format!("0x{status:04X}"), "{what}: {detail}");
    }
    let rec = AuditRecord::new(
        now_ms(),
        AuditEvent::Query,
        format!("{}@{}", who.calling, who.peer.ip()),
        format!("{what}: {detail}"),
    );
    let spool = Arc::clone(&who.shared.spool);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || spool.audit(rec)).await {
        tracing::error!("cannot write the audit record: {e}");
    }
    Ok(())
}

struct Done {
    status: u16,
    detail: String,
    ops: SubOperations,
}

type Outcome = Result<Done, (u16, String)>;

/// "C-FIND STUDY (Study Instance UID 1.2.3)": what was asked, without
/// patient identifiers (the audit trail names studies, not patients).
fn describe(q: &QueryRequest, id: &Identifier) -> String {
    let level = id.get(tag::QUERY_RETRIEVE_LEVEL).unwrap_or("?");
    let mut keys = Vec::new();
    if id.get(tag::PATIENT_ID).is_some() {
        keys.push("by Patient ID".to_string());
    }
    for (t, name) in [
        (tag::STUDY_INSTANCE_UID, "Study Instance UID"),
        (tag::SERIES_INSTANCE_UID, "Series Instance UID"),
    ] {
        if let Some(v) = id.get(t) {
            keys.push(format!("{name} {v}"));
        }
    }
    match &q.move_destination {
        None => format!("C-FIND {level} ({})", keys.join(", ")),
        Some(d) => format!("C-MOVE {level} to {d} ({})", keys.join(", ")),
    }
}

/// The request names a patient or a study exactly (no wildcards), at
/// STUDY or SERIES level: the center asks about a case, it does not browse
/// the hospital's archive.
fn check(id: &Identifier) -> Result<(), (u16, String)> {
    match id.get(tag::QUERY_RETRIEVE_LEVEL) {
        Some("STUDY" | "SERIES") => {}
        other => {
            return Err((
                BAD_IDENTIFIER,
                format!("Query/Retrieve Level {other:?}: this box answers STUDY and SERIES"),
            ))
        }
    }
    let exact = |t| id.get(t).is_some_and(|v: &str| !v.contains(['*', '?']));
    if !exact(tag::PATIENT_ID) && !exact(tag::STUDY_INSTANCE_UID) {
        return Err((
            UNABLE,
            "name a Patient ID or Study Instance UID exactly (no wildcards): the box answers only for patients it relayed".into(),
        ));
    }
    Ok(())
}

async fn connect(shared: &Shared) -> Result<Scu, (u16, String)> {
    let Some(pacs) = &shared.config.pacs else {
        return Err((UNABLE, "no [pacs] is configured".into()));
    };
    crate::prefetch::connect_pacs(pacs)
        .await
        .map_err(|e| (UNABLE, format!("the hospital's PACS: {e}")))
}

/// Remembers, per (Patient ID, issuer), whether the box relayed a study of
/// that patient.
#[derive(Default)]
struct Known(HashMap<(String, Option<String>), bool>);

impl Known {
    async fn relayed(&mut self, shared: &Shared, answer: &Identifier) -> bool {
        let Some(pid) = answer.get(tag::PATIENT_ID).map(str::to_string) else {
            return false;
        };
        let issuer = answer.get(tag::ISSUER_OF_PATIENT_ID).map(str::to_string);
        if let Some(&k) = self.0.get(&(pid.clone(), issuer.clone())) {
            return k;
        }
        let spool = Arc::clone(&shared.spool);
        let (p, i) = (pid.clone(), issuer.clone());
        let known = tokio::task::spawn_blocking(move || spool.relayed_patient(&p, i.as_deref()))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        self.0.insert((pid, issuer), known);
        known
    }
}

/// C-FIND: the center's identifier goes to the PACS as it came (with
/// Patient ID and its issuer added as return keys); each answer about a
/// relayed patient goes back as the PACS sent it.
async fn find(
    who: &Asker<'_>,
    stream: &mut TcpStream,
    q: &QueryRequest,
) -> Result<Outcome, wire::WireError> {
    let mut scu = match connect(who.shared).await {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let asked = query::with_return_key(&q.identifier, tag::PATIENT_ID)
        .and_then(|raw| query::with_return_key(&raw, tag::ISSUER_OF_PATIENT_ID));
    let (Some(asked), Some(pc)) = (asked, scu.context_for(STUDY_ROOT_FIND, IMPLICIT_VR_LE)) else {
        scu.release().await;
        return Ok(Err((
            UNABLE,
            "the hospital's PACS did not accept Study Root C-FIND".into(),
        )));
    };
    let found = scu.find_raw(pc, STUDY_ROOT_FIND, &asked).await;
    scu.release().await;
    let (status, answers) = match found {
        Ok(f) => f,
        Err(e) => return Ok(Err((UNABLE, format!("the hospital's PACS: {e}")))),
    };
    let mut known = Known::default();
    let (mut sent, mut withheld) = (0, 0);
    for raw in answers {
        let relayed = match Identifier::decode(&raw) {
            Some(a) => known.relayed(who.shared, &a).await,
            None => false,
        };
        if !relayed {
            withheld += 1;
            continue;
        }
        wire::send_command(
            stream,
            q.context.id,
            &dimse::c_find_rsp(q.message_id, STUDY_ROOT_FIND, 0xFF00, true, None),
        )
        .await?;
        wire::send_dataset(stream, q.context.id, &raw, who.peer_max_pdu).await?;
        sent += 1;
    }
    let detail = format!(
        "{sent} answer(s){}",
        if withheld > 0 {
            format!(", {withheld} withheld (patients this box never relayed)")
        } else {
            String::new()
        }
    );
    Ok(match status {
        0 => Ok(Done {
            status: 0,
            detail,
            ops: SubOperations::default(),
        }),
        s => Err((
            s,
            format!("the hospital's PACS answered 0x{s:04X} after {detail}"),
        )),
    })
}

/// C-MOVE: every study named must be of a relayed patient (asked of the
/// PACS first); then the box moves them to itself, into the spool.
async fn retrieve(who: &Asker<'_>, q: &QueryRequest, id: &Identifier) -> Outcome {
    let shared = who.shared;
    let destination = q.move_destination.clone().unwrap_or_default();
    if !shared
        .config
        .destinations
        .iter()
        .any(|d| d.ae_title.as_str() == destination)
    {
        return Err((
            UNKNOWN_DESTINATION,
            format!("move destination {destination:?} is none of this box's [[destinations]]"),
        ));
    }
    let studies = id.values(tag::STUDY_INSTANCE_UID);
    if studies.is_empty() || studies.iter().any(|s| s.contains(['*', '?'])) {
        return Err((
            BAD_IDENTIFIER,
            "a C-MOVE names its studies by Study Instance UID, exactly".into(),
        ));
    }
    let series = id.values(tag::SERIES_INSTANCE_UID);
    let level = id.get(tag::QUERY_RETRIEVE_LEVEL).unwrap_or("STUDY");
    if level == "SERIES" && (studies.len() != 1 || series.is_empty()) {
        return Err((
            BAD_IDENTIFIER,
            "a SERIES-level C-MOVE names one Study Instance UID and its Series Instance UIDs"
                .into(),
        ));
    }
    let mut scu = connect(shared).await?;
    let result = move_studies(shared, &mut scu, &studies, &series, level).await;
    scu.release().await;
    result
}

async fn move_studies(
    shared: &Shared,
    scu: &mut Scu,
    studies: &[String],
    series: &[String],
    level: &str,
) -> Outcome {
    let find = scu.context_for(STUDY_ROOT_FIND, IMPLICIT_VR_LE).ok_or((
        UNABLE,
        "the hospital's PACS did not accept Study Root C-FIND".to_string(),
    ))?;
    let mv = scu.context_for(STUDY_ROOT_MOVE, IMPLICIT_VR_LE).ok_or((
        UNABLE,
        "the hospital's PACS did not accept Study Root C-MOVE".to_string(),
    ))?;
    let mut known = Known::default();
    for study in studies {
        let probe = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
            .with(tag::STUDY_INSTANCE_UID, study)
            .with(tag::PATIENT_ID, "")
            .with(tag::ISSUER_OF_PATIENT_ID, "");
        let (status, answers) = scu
            .find(find, STUDY_ROOT_FIND, &probe)
            .await
            .map_err(|e| (UNABLE, format!("the hospital's PACS: {e}")))?;
        if status != 0 {
            return Err((
                UNABLE,
                format!("the hospital's PACS answered 0x{status:04X} to a C-FIND for {study}"),
            ));
        }
        let Some(answer) = answers.first() else {
            return Err((UNABLE, format!("the hospital's PACS has no study {study}")));
        };
        if !known.relayed(shared, answer).await {
            return Err((
                UNABLE,
                format!("study {study} is of a patient this box never relayed a study of"),
            ));
        }
    }
    let own = shared.config.dicom.ae_title.to_string();
    let mut total = SubOperations::default();
    for study in studies {
        let mut ident = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, level)
            .with(tag::STUDY_INSTANCE_UID, study);
        if level == "SERIES" {
            ident = ident.with(tag::SERIES_INSTANCE_UID, &series.join("\\"));
        }
        let (status, ops) = scu
            .retrieve(mv, STUDY_ROOT_MOVE, &own, &ident, |mid| {
                tracing::info!(study = %study, message_id = mid, "C-MOVE for the center to {own}");
            })
            .await
            .map_err(|e| (UNABLE, format!("the hospital's PACS: {e}")))?;
        match status {
            0x0000 | SOME_FAILED => {}
            UNKNOWN_DESTINATION => {
                return Err((
                    UNABLE,
                    format!(
                        "the hospital's PACS does not know {own} as a move destination (0xA801)"
                    ),
                ))
            }
            other => {
                return Err((
                    UNABLE,
                    format!("the hospital's PACS answered 0x{other:04X} to the C-MOVE of {study}"),
                ))
            }
        }
        total.completed = total.completed.saturating_add(ops.completed);
        total.failed = total.failed.saturating_add(ops.failed);
        total.warning = total.warning.saturating_add(ops.warning);
    }
    Ok(Done {
        status: if total.failed > 0 || total.warning > 0 {
            SOME_FAILED
        } else {
            0
        },
        detail: format!(
            "{} instance(s) into the spool for the destinations ({} failed, {} warning)",
            total.completed, total.failed, total.warning
        ),
        ops: total,
    })
}
