//! Priors by C-GET (`priors.retrieve = "get"`), for a PACS that cannot be
//! told of the box as a move destination: the PACS sends the instances on
//! the box's own association.
//!
//! For each prior not yet retrieved: an IMAGE-level C-FIND learns the SOP
//! classes the study holds (C-GET needs them at association: each is
//! proposed in explicit and implicit VR little endian, with the SCP role
//! asked for); then one C-GET of the study. Each C-STORE that arrives is
//! spooled like any instance (sealed, fsync before its C-STORE-RSP says
//! Success) as a `prior`, at low priority, and queued for the destinations;
//! the spool's refusal (0xA700 when full) goes back to the PACS as the
//! store's status. An instance is held whole in memory while it is
//! spooled, so C-GET takes instances up to 256 MiB; larger ones need C-MOVE.

use std::collections::BTreeSet;
use std::sync::Arc;

use kakehashi_dicom::dimse::status;
use kakehashi_dicom::query::{tag, Identifier, STUDY_ROOT_FIND, STUDY_ROOT_GET};
use kakehashi_dicom::scu::{GetEvent, Scu};
use kakehashi_dicom::uids::{EXPLICIT_VR_LE, IMPLICIT_VR_LE};
use kakehashi_dicom::{part10, scan};
use kakehashi_spool::{Accepted, Arrival, InstanceMeta, Prefetch, Priority, Role};

use crate::{now_ms, Shared};

/// At most this many SOP classes in one prior (two contexts each, of 127).
const MAX_CLASSES: usize = 62;

/// Retrieves the priors of `uid` not yet retrieved; what the PACS said.
/// `find` is an association with the PACS that accepted C-FIND.
pub async fn retrieve(
    shared: &Shared,
    find: &mut Scu,
    uid: &str,
    state: &mut Prefetch,
) -> Result<String, String> {
    let Some(pacs) = &shared.config.pacs else {
        return Err("no [pacs]".into());
    };
    let pc = find
        .context_for(STUDY_ROOT_FIND, IMPLICIT_VR_LE)
        .ok_or("the PACS did not accept Study Root C-FIND")?;
    let earlier = state.retrieved.len();
    let mut words = Vec::new();
    for study in crate::prefetch::not_retrieved(state) {
        let query = Identifier::new()
            .with(tag::QUERY_RETRIEVE_LEVEL, "IMAGE")
            .with(tag::STUDY_INSTANCE_UID, &study)
            .with(tag::SERIES_INSTANCE_UID, "")
            .with(tag::SOP_INSTANCE_UID, "")
            .with(tag::SOP_CLASS_UID, "");
        let (st, answers) = find
            .find(pc, STUDY_ROOT_FIND, &query)
            .await
            .map_err(|e| e.to_string())?;
        if st != 0 {
            return Err(format!(
                "IMAGE-level C-FIND of {study} answered status 0x{st:04X}"
            ));
        }
        let classes: BTreeSet<String> = answers
            .iter()
            .filter_map(|a| a.get(tag::SOP_CLASS_UID).map(str::to_string))
            .collect();
        if classes.len() > MAX_CLASSES {
            return Err(format!(
                "{study} holds {} SOP classes, more than one C-GET association can take ({MAX_CLASSES}): use priors.retrieve = \"move\"",
                classes.len()
            ));
        }
        let said = if classes.is_empty() {
            format!("{study}: no instances in the PACS")
        } else {
            get_study(shared, pacs, &study, &classes).await?
        };
        crate::prefetch::record_retrieved(shared, uid, state, study, &said).await?;
        words.push(said);
    }
    if earlier > 0 {
        words.push(format!("{earlier} retrieved before"));
    }
    Ok(words.join("; "))
}

/// One C-GET of `study` on an association proposing `classes`.
async fn get_study(
    shared: &Shared,
    pacs: &kakehashi_config::Destination,
    study: &str,
    classes: &BTreeSet<String>,
) -> Result<String, String> {
    let opts = crate::prefetch::pacs_options(pacs);
    let mut proposed = vec![(STUDY_ROOT_GET.to_string(), IMPLICIT_VR_LE.to_string())];
    for c in classes {
        proposed.push((c.clone(), EXPLICIT_VR_LE.to_string()));
        proposed.push((c.clone(), IMPLICIT_VR_LE.to_string()));
    }
    let scp_of: Vec<String> = classes.iter().cloned().collect();
    let addrs = kakehashi_dicom::scu::resolve(&pacs.address, pacs.connect_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut scu = Scu::connect_with_roles(&pacs.address, &addrs, &opts, &proposed, &scp_of)
        .await
        .map_err(|e| e.to_string())?;
    let result = run_get(shared, &mut scu, pacs, study).await;
    scu.release().await;
    result
}

async fn run_get(
    shared: &Shared,
    scu: &mut Scu,
    pacs: &kakehashi_config::Destination,
    study: &str,
) -> Result<String, String> {
    let pc = scu
        .context_for(STUDY_ROOT_GET, IMPLICIT_VR_LE)
        .ok_or("the PACS did not accept Study Root C-GET")?;
    let ident = Identifier::new()
        .with(tag::QUERY_RETRIEVE_LEVEL, "STUDY")
        .with(tag::STUDY_INSTANCE_UID, study);
    let id = scu
        .get_start(pc, STUDY_ROOT_GET, &ident)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(study = %study, message_id = id, "C-GET of a prior study");
    let (mut stored, mut refused) = (0u32, 0u32);
    loop {
        match scu.get_next(id).await.map_err(|e| e.to_string())? {
            GetEvent::Store {
                pc,
                message_id,
                sop_class,
                sop_instance,
                transfer_syntax,
                dataset,
            } => {
                let code = spool_prior(
                    shared,
                    pacs,
                    &sop_class,
                    &sop_instance,
                    &transfer_syntax,
                    dataset,
                    id,
                )
                .await;
                if code == status::SUCCESS {
                    stored += 1;
                } else {
                    refused += 1;
                }
                scu.store_response(pc, message_id, &sop_class, &sop_instance, code)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            GetEvent::Done { status, ops } => {
                return match status {
                    0x0000 | 0xB000 => Ok(format!(
                        "{study}: {} retrieved by C-GET ({stored} spooled here), {} failed, {} warning",
                        ops.completed, ops.failed, ops.warning
                    )),
                    other => Err(format!(
                        "C-GET of {study} answered status 0x{other:04X} ({stored} spooled, {refused} refused here)"
                    )),
                };
            }
        }
    }
}

/// Spools one instance a C-GET brought as a `prior`; the C-STORE status
/// to answer with.
async fn spool_prior(
    shared: &Shared,
    pacs: &kakehashi_config::Destination,
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    dataset: Vec<u8>,
    get_id: u16,
) -> u16 {
    if !kakehashi_dicom::uids::is_valid_uid(sop_instance) {
        return status::CANNOT_UNDERSTAND;
    }
    let keys = scan::routing_keys(
        transfer_syntax,
        &dataset[..dataset.len().min(scan::SCAN_LIMIT)],
    );
    let header = part10::file_meta(
        sop_class,
        sop_instance,
        transfer_syntax,
        pacs.ae_title.as_str(),
    );
    let meta = InstanceMeta {
        sop_class_uid: sop_class.to_string(),
        sop_instance_uid: sop_instance.to_string(),
        transfer_syntax_uid: transfer_syntax.to_string(),
        study_instance_uid: keys.study_instance_uid.unwrap_or_default(),
        patient_id: keys.patient_id.unwrap_or_default(),
        source_ae: pacs.ae_title.to_string(),
        source_ip: pacs.address.clone(),
        priority: Priority::Low,
        role: Role::Prior,
        amendment: false,
        arrival: Arrival {
            accession_number: keys.accession_number,
            issuer: keys.issuer_of_patient_id,
            via: Some(format!("retrieved by our C-GET (message ID {get_id})")),
            modality: keys.modality,
            body_part: keys.body_part,
            ..Default::default()
        },
    };
    let spool = Arc::clone(&shared.spool);
    let uid = sop_instance.to_string();
    let accepted = tokio::task::spawn_blocking(move || {
        let mut inc = spool.begin(&header, &uid)?;
        inc.write(&dataset)?;
        inc.commit(meta, now_ms())
    })
    .await;
    match accepted {
        Ok(Ok(Accepted::Queued { record, superseded })) => {
            for f in &shared.forwarders {
                if let Some(old) = superseded {
                    f.forget(old);
                }
                f.enqueue(&record);
            }
            status::SUCCESS
        }
        Ok(Ok(Accepted::Duplicate { .. })) => status::SUCCESS,
        Ok(Err(e)) if e.is_out_of_space() => {
            tracing::warn!(sop_instance, "C-GET instance refused with 0xA700: {e}");
            status::OUT_OF_RESOURCES
        }
        Ok(Err(e)) => {
            tracing::error!(sop_instance, "cannot spool a C-GET instance: {e}");
            status::PROCESSING_FAILURE
        }
        Err(e) => {
            tracing::error!(sop_instance, "spool task failed: {e}");
            status::PROCESSING_FAILURE
        }
    }
}
