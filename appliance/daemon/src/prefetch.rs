//! Prefetching prior studies (`[priors]`): when a new study from the
//! hospital has been stable for `priors.stable_after`, the box asks the
//! hospital's PACS (`[pacs]`) for the patient's other studies (C-FIND at
//! STUDY level by Patient ID and Issuer, never by name; SERIES level when
//! the PACS does not return Modalities in Study, or for body parts), keeps
//! the `priors.max_studies` most recent within `priors.max_age` that are
//! not only reports or presentation states (and, by config, share a
//! modality or body part with the new study), skips those it already relayed,
//! and retrieves them with C-MOVE to its own AE. The PACS's C-STOREs
//! arrive at the ordinary listener, carrying our Move Originator AE, and
//! are spooled as `prior` (low priority: after current studies). With
//! `priors.retrieve = "get"` they come by C-GET on the box's own
//! association instead ([`crate::retrieve_get`]).
//!
//! Every step is durable in the studies table before the next: the chosen
//! priors (and their entries, so no later study fetches them again) before
//! the first C-MOVE; each prior as its C-MOVE finishes; `done` after the
//! last. A crash in between retries only the priors not yet retrieved (and
//! the spool's duplicate detection keeps an instance still spooled from
//! being queued twice).

use std::sync::Arc;
use std::time::Duration;

use kakehashi_dicom::query::{tag, Identifier, STUDY_ROOT_FIND, STUDY_ROOT_MOVE};
use kakehashi_dicom::scu::{Scu, ScuOptions};
use kakehashi_dicom::uids::IMPLICIT_VR_LE;
use kakehashi_spool::{Prefetch, PrefetchState, StudyEntry};
use tokio_util::sync::CancellationToken;

use crate::{now_ms, Shared};

/// Studies made only of these are not priors a radiologist compares with.
const NOT_IMAGES: [&str; 4] = ["SR", "DOC", "KO", "PR"];
/// Attempts before a prefetch is given up (shown in `kakehashi studies`).
const MAX_ATTEMPTS: u32 = 20;

pub async fn run(shared: Arc<Shared>, token: CancellationToken) {
    let Some(cfg) = shared.config.priors.clone() else {
        return;
    };
    let stable_ms = cfg.stable_after.as_millis() as u64;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let spool = Arc::clone(&shared.spool);
        let due = match tokio::task::spawn_blocking(move || spool.prefetch_due(now_ms(), stable_ms))
            .await
        {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::error!("cannot read the studies table: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("prefetch task failed: {e}");
                continue;
            }
        };
        for (uid, entry) in due {
            if token.is_cancelled() {
                return;
            }
            prefetch(&shared, &uid, entry).await;
        }
    }
}

/// One attempt at the priors of study `uid`.
async fn prefetch(shared: &Shared, uid: &str, entry: StudyEntry) {
    let Some(mut state) = entry.prefetch.clone() else {
        return;
    };
    let outcome = attempt(shared, uid, &entry, &mut state).await;
    let now = now_ms();
    let (detail, chosen) = match outcome {
        Ok(Step::Chosen(priors)) => {
            state.state = PrefetchState::Retrieving;
            state.priors = priors.clone();
            let d = if priors.is_empty() {
                state.state = PrefetchState::Done;
                "no prior study to fetch".to_string()
            } else {
                format!(
                    "{} prior stud{} chosen: {}",
                    priors.len(),
                    if priors.len() == 1 { "y" } else { "ies" },
                    priors.join(", ")
                )
            };
            state.detail = Some(d.clone());
            (d, priors)
        }
        Ok(Step::Retrieved(d)) => {
            state.state = PrefetchState::Done;
            state.detail = Some(d.clone());
            (d, Vec::new())
        }
        Err(e) => {
            state.attempts += 1;
            let wait = Duration::from_secs(5)
                .saturating_mul(1 << state.attempts.min(6))
                .min(Duration::from_secs(300));
            state.next_attempt_ms = now + wait.as_millis() as u64;
            if state.attempts >= MAX_ATTEMPTS {
                state.state = PrefetchState::Failed;
            }
            let d = format!(
                "attempt {}: {e}{}",
                state.attempts,
                if state.state == PrefetchState::Failed {
                    "; given up"
                } else {
                    ""
                }
            );
            tracing::warn!(study = uid, "prefetch of priors: {d}");
            state.detail = Some(d.clone());
            (d, Vec::new())
        }
    };
    tracing::info!(study = uid, state = ?state.state, "prefetch: {detail}");
    let spool = Arc::clone(&shared.spool);
    let uid2 = uid.to_string();
    let saved = tokio::task::spawn_blocking(move || {
        spool.set_prefetch(&uid2, state, &chosen, &detail, now)
    })
    .await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(study = uid, "cannot record the prefetch: {e}"),
        Err(e) => tracing::error!(study = uid, "prefetch record task failed: {e}"),
    }
}

enum Step {
    /// The priors to retrieve (recorded before the first C-MOVE).
    Chosen(Vec<String>),
    /// All retrieved: what the PACS said.
    Retrieved(String),
}

async fn attempt(
    shared: &Shared,
    uid: &str,
    entry: &StudyEntry,
    state: &mut Prefetch,
) -> Result<Step, String> {
    let (Some(pacs), Some(cfg)) = (&shared.config.pacs, &shared.config.priors) else {
        return Err("no [pacs]".into());
    };
    let mut scu = connect_pacs(pacs).await.map_err(|e| e.to_string())?;
    let result = match state.state {
        PrefetchState::Retrieving if cfg.get => {
            crate::retrieve_get::retrieve(shared, &mut scu, uid, state)
                .await
                .map(Step::Retrieved)
        }
        PrefetchState::Retrieving => retrieve(shared, &mut scu, uid, state)
            .await
            .map(Step::Retrieved),
        _ => choose(shared, &mut scu, uid, entry, cfg)
            .await
            .map(Step::Chosen),
    };
    scu.release().await;
    result
}

/// How the box associates with the hospital's PACS.
pub fn pacs_options(pacs: &kakehashi_config::Destination) -> ScuOptions {
    ScuOptions {
        calling_ae: pacs.calling_ae_title.to_string(),
        called_ae: pacs.ae_title.to_string(),
        max_pdu: pacs.max_pdu,
        connect_timeout: pacs.connect_timeout,
        response_timeout: pacs.response_timeout,
    }
}

/// The chosen priors whose retrieval has not finished yet.
pub fn not_retrieved(state: &Prefetch) -> Vec<String> {
    state
        .priors
        .iter()
        .filter(|p| !state.retrieved.contains(p))
        .cloned()
        .collect()
}

/// An association with the hospital's PACS for Study Root C-FIND and
/// C-MOVE (priors, and the center's own requests).
pub async fn connect_pacs(
    pacs: &kakehashi_config::Destination,
) -> Result<Scu, kakehashi_dicom::scu::ScuError> {
    let opts = pacs_options(pacs);
    let contexts = [
        (STUDY_ROOT_FIND.to_string(), IMPLICIT_VR_LE.to_string()),
        (STUDY_ROOT_MOVE.to_string(), IMPLICIT_VR_LE.to_string()),
    ];
    Scu::connect(&pacs.address, &opts, &contexts).await
}

async fn choose(
    shared: &Shared,
    scu: &mut Scu,
    uid: &str,
    entry: &StudyEntry,
    cfg: &kakehashi_config::PriorsConfig,
) -> Result<Vec<String>, String> {
    let find = scu
        .context_for(STUDY_ROOT_FIND, IMPLICIT_VR_LE)
        .ok_or("the PACS did not accept Study Root C-FIND")?;
    let patient = entry
        .patient
        .as_deref()
        .and_then(|p| shared.spool.open_study_value(uid, p));
    let Some(patient) = patient else {
        return Ok(Vec::new());
    };
    if patient.contains(['*', '?', '\\']) {
        return Err(format!(
            "Patient ID {patient:?} holds wildcard characters; not queried"
        ));
    }
    let issuer = entry
        .issuer
        .as_deref()
        .and_then(|i| shared.spool.open_study_value(uid, i));
    let mut query = Identifier::new()
        .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
        .with(tag::PATIENT_ID, &patient)
        .with(tag::STUDY_INSTANCE_UID, "")
        .with(tag::STUDY_DATE, "")
        .with(tag::STUDY_TIME, "")
        .with(tag::MODALITIES_IN_STUDY, "")
        .with(tag::ACCESSION_NUMBER, "");
    if let Some(i) = &issuer {
        query = query.with(tag::ISSUER_OF_PATIENT_ID, i);
    }
    let (status, answers) = scu
        .find(find, STUDY_ROOT_FIND, &query)
        .await
        .map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!("C-FIND answered status 0x{status:04X}"));
    }
    let today = today();
    let max_age_days = (cfg.max_age.as_secs() / 86_400) as i64;
    let mut candidates = Vec::new();
    for a in answers {
        let Some(study) = a.get(tag::STUDY_INSTANCE_UID).map(str::to_string) else {
            continue;
        };
        // Only this patient (a PACS that ignores a key must not widen the query).
        if study == uid || a.get(tag::PATIENT_ID).is_some_and(|p| p != patient) {
            continue;
        }
        let date = a
            .get(tag::STUDY_DATE)
            .and_then(kakehashi_dicom::days_from_da);
        if let (Some(d), Some(t)) = (date, today) {
            if t - d > max_age_days {
                continue;
            }
        }
        let mut modalities = a.values(tag::MODALITIES_IN_STUDY);
        let mut body_parts = Vec::new();
        if modalities.is_empty() || cfg.same_body_part {
            // dcmqrscp does not return Modalities in Study, and body parts
            // are a series attribute: ask per series.
            let series = series_of(scu, find, &study).await?;
            if modalities.is_empty() {
                modalities = series.0;
            }
            body_parts = series.1;
        }
        if !modalities.is_empty() && modalities.iter().all(|m| NOT_IMAGES.contains(&m.as_str())) {
            continue;
        }
        // The rules: a study of another modality or body part is no
        // comparison (unknown on either side: kept).
        let disjoint = |ours: &[String], theirs: &[String]| {
            !ours.is_empty() && !theirs.is_empty() && !ours.iter().any(|o| theirs.contains(o))
        };
        if cfg.same_modality && disjoint(&entry.modalities, &modalities) {
            continue;
        }
        if cfg.same_body_part && disjoint(&entry.body_parts, &body_parts) {
            continue;
        }
        let when = format!(
            "{}{}",
            a.get(tag::STUDY_DATE).unwrap_or(""),
            a.get(tag::STUDY_TIME).unwrap_or("")
        );
        candidates.push((when, study));
    }
    candidates.sort_by(|a, b| b.cmp(a));
    candidates.dedup_by(|a, b| a.1 == b.1);
    let mut chosen = Vec::new();
    for (_, study) in candidates.into_iter().take(cfg.max_studies) {
        // Already relayed (as a current study or as a prior): not again.
        let spool = Arc::clone(&shared.spool);
        let s = study.clone();
        let known = tokio::task::spawn_blocking(move || spool.study(&s))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if known.is_none() {
            chosen.push(study);
        }
    }
    Ok(chosen)
}

/// The modalities and body parts of a study's series.
async fn series_of(
    scu: &mut Scu,
    find: u8,
    study: &str,
) -> Result<(Vec<String>, Vec<String>), String> {
    let query = Identifier::new()
        .with(tag::QUERY_RETRIEVE_LEVEL, "SERIES")
        .with(tag::STUDY_INSTANCE_UID, study)
        .with(tag::SERIES_INSTANCE_UID, "")
        .with(tag::MODALITY, "")
        .with(tag::BODY_PART_EXAMINED, "");
    let (status, answers) = scu
        .find(find, STUDY_ROOT_FIND, &query)
        .await
        .map_err(|e| e.to_string())?;
    if status != 0 {
        return Err(format!(
            "SERIES-level C-FIND answered status 0x{status:04X}"
        ));
    }
    let values = |t: u32| {
        let mut v: Vec<String> = answers
            .iter()
            .filter_map(|a| a.get(t).filter(|x| !x.is_empty()).map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    Ok((values(tag::MODALITY), values(tag::BODY_PART_EXAMINED)))
}

/// C-MOVEs each chosen prior not yet retrieved; each one that finishes is
/// recorded at once, so a crash or a failure later retries only the rest.
async fn retrieve(
    shared: &Shared,
    scu: &mut Scu,
    uid: &str,
    state: &mut Prefetch,
) -> Result<String, String> {
    let mv = scu
        .context_for(STUDY_ROOT_MOVE, IMPLICIT_VR_LE)
        .ok_or("the PACS did not accept Study Root C-MOVE")?;
    let destination = shared.config.dicom.ae_title.to_string();
    let earlier = state.retrieved.len();
    let mut words = Vec::new();
    for study in not_retrieved(state) {
        let query = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
            .with(tag::STUDY_INSTANCE_UID, &study);
        let (status, ops) = scu
            .retrieve(mv, STUDY_ROOT_MOVE, &destination, &query, |id| {
                tracing::info!(study = %study, message_id = id, "C-MOVE of a prior study to {destination}");
            })
            .await
            .map_err(|e| e.to_string())?;
        let said = match status {
            0x0000 | 0xB000 => format!(
                "{study}: {} retrieved, {} failed, {} warning",
                ops.completed, ops.failed, ops.warning
            ),
            0xA801 => {
                return Err(format!(
                    "the PACS does not know {destination} as a move destination (0xA801): add AE {destination} at this box's address and DICOM port to the PACS"
                ))
            }
            other => return Err(format!("C-MOVE of {study} answered status 0x{other:04X}")),
        };
        record_retrieved(shared, uid, state, study, &said).await?;
        words.push(said);
    }
    if earlier > 0 {
        words.push(format!("{earlier} retrieved before"));
    }
    Ok(words.join("; "))
}

/// Prior `study` of current study `uid` is retrieved: recorded at once
/// (unless it was the last: `done` is recorded then), so a crash later
/// retries only the others.
pub async fn record_retrieved(
    shared: &Shared,
    uid: &str,
    state: &mut Prefetch,
    study: String,
    said: &str,
) -> Result<(), String> {
    state.retrieved.push(study);
    if state.retrieved.len() < state.priors.len() {
        let spool = Arc::clone(&shared.spool);
        let (uid, progress, detail) = (uid.to_string(), state.clone(), said.to_string());
        tokio::task::spawn_blocking(move || {
            spool.set_prefetch(&uid, progress, &[], &detail, now_ms())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot record the retrieval: {e}"))?;
    }
    Ok(())
}

fn today() -> Option<i64> {
    Some((now_ms() / 86_400_000) as i64)
}
