//! Association negotiation as the acceptor: a pure function from the
//! request (and who sent it) to an A-ASSOCIATE-AC or an A-ASSOCIATE-RJ.

use std::net::IpAddr;

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};

use crate::uids::{
    is_storage_sop_class, is_valid_uid, trim_uid, APPLICATION_CONTEXT, IMPLICIT_VR_LE, VERIFICATION,
};

/// The Asynchronous Operations Window sub-item (PS3.7 D.3.3.3).
pub const ASYNC_OPERATIONS_WINDOW: u8 = 0x53;

/// Who may associate, and the box's side of the negotiation.
#[derive(Debug)]
pub struct Policy {
    pub ae_title: String,
    pub sources: Vec<SourceRule>,
    pub max_pdu: u32,
    /// The config key that lists the sources, for rejection reasons
    /// (`dicom.sources`, `results.from`).
    pub sources_key: &'static str,
    /// `None`: every storage SOP class; otherwise only these.
    pub storage_classes: Option<Vec<String>>,
    /// Also accept Study Root C-FIND and C-MOVE (the results port, where the
    /// center asks the box for more of a patient's studies).
    pub query_retrieve: bool,
}

/// A calling AE title allowed to send, optionally only from some addresses.
#[derive(Debug)]
pub struct SourceRule {
    pub ae_title: String,
    pub address: Option<Box<dyn AddressMatch>>,
}

/// Address restriction of a source (implemented by the config's CIDR type).
pub trait AddressMatch: std::fmt::Debug + Send + Sync {
    fn matches(&self, ip: IpAddr) -> bool;
}

/// A presentation context the box accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub ac: AssociationAC,
    pub contexts: Vec<AcceptedContext>,
    /// Largest PDU the peer accepts from us (0 in the request means no limit).
    pub peer_max_pdu: u32,
    pub calling_ae: String,
}

/// Why an association was rejected, for logs and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub rj: AssociationRJ,
    pub reason: String,
}

fn reject(result: AssociationRJResult, source: AssociationRJSource, reason: String) -> Rejected {
    Rejected {
        rj: AssociationRJ { result, source },
        reason,
    }
}

/// Decides on `rq` from `peer`. `at_capacity`: the box already serves its
/// maximum number of associations.
pub fn negotiate(
    rq: &AssociationRQ,
    peer: IpAddr,
    policy: &Policy,
    at_capacity: bool,
) -> Result<Accepted, Rejected> {
    use AssociationRJSource::*;
    let calling = rq.calling_ae_title.trim().to_string();
    let called = rq.called_ae_title.trim().to_string();

    if rq.protocol_version & 1 == 0 {
        return Err(reject(
            AssociationRJResult::Permanent,
            ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            format!(
                "protocol version {:#06x} not supported",
                rq.protocol_version
            ),
        ));
    }
    if trim_uid(&rq.application_context_name) != APPLICATION_CONTEXT {
        return Err(reject(
            AssociationRJResult::Permanent,
            ServiceUser(AssociationRJServiceUserReason::ApplicationContextNameNotSupported),
            format!(
                "application context {:?} not supported",
                rq.application_context_name
            ),
        ));
    }
    if called != policy.ae_title {
        return Err(reject(
            AssociationRJResult::Permanent,
            ServiceUser(AssociationRJServiceUserReason::CalledAETitleNotRecognized),
            format!(
                "called AE title {called:?} is not this box ({:?})",
                policy.ae_title
            ),
        ));
    }
    let known: Vec<_> = policy
        .sources
        .iter()
        .filter(|s| s.ae_title == calling)
        .collect();
    if known.is_empty() {
        return Err(reject(
            AssociationRJResult::Permanent,
            ServiceUser(AssociationRJServiceUserReason::CallingAETitleNotRecognized),
            format!(
                "calling AE title {calling:?} is not in {}",
                policy.sources_key
            ),
        ));
    }
    if !known
        .iter()
        .any(|s| s.address.as_ref().is_none_or(|a| a.matches(peer)))
    {
        return Err(reject(
            AssociationRJResult::Permanent,
            ServiceUser(AssociationRJServiceUserReason::CallingAETitleNotRecognized),
            format!("calling AE title {calling:?} is not allowed from address {peer}"),
        ));
    }
    if at_capacity {
        return Err(reject(
            AssociationRJResult::Transient,
            ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
            "too many concurrent associations (dicom.max_associations)".into(),
        ));
    }

    let mut peer_max_pdu = 16384;
    let mut async_window = false;
    for v in &rq.user_variables {
        match v {
            UserVariableItem::MaxLength(len) => peer_max_pdu = *len,
            UserVariableItem::Unknown(ASYNC_OPERATIONS_WINDOW, _) => async_window = true,
            _ => {}
        }
    }

    let mut results = Vec::new();
    let mut contexts = Vec::new();
    for pc in &rq.presentation_contexts {
        let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
        let offered: Vec<&str> = pc
            .transfer_syntaxes
            .iter()
            .map(|t| trim_uid(t))
            .filter(|t| is_valid_uid(t))
            .collect();
        let query = policy.query_retrieve
            && (abstract_syntax == crate::query::STUDY_ROOT_FIND
                || abstract_syntax == crate::query::STUDY_ROOT_MOVE);
        let outcome = if abstract_syntax == VERIFICATION || query {
            offered
                .iter()
                .find(|t| **t == IMPLICIT_VR_LE)
                .or(offered.first())
                .map(|t| t.to_string())
                .ok_or(PresentationContextResultReason::TransferSyntaxesNotSupported)
        } else if is_valid_uid(&abstract_syntax)
            && is_storage_sop_class(&abstract_syntax)
            && policy
                .storage_classes
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&abstract_syntax))
        {
            // The sender's first choice, whatever it is: the relay never
            // decodes, so it must never make the sender transcode either.
            offered
                .first()
                .map(|t| t.to_string())
                .ok_or(PresentationContextResultReason::TransferSyntaxesNotSupported)
        } else {
            Err(PresentationContextResultReason::AbstractSyntaxNotSupported)
        };
        match outcome {
            Ok(ts) => {
                results.push(PresentationContextResult {
                    id: pc.id,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: ts.clone(),
                });
                contexts.push(AcceptedContext {
                    id: pc.id,
                    abstract_syntax,
                    transfer_syntax: ts,
                });
            }
            Err(reason) => results.push(PresentationContextResult {
                id: pc.id,
                reason,
                transfer_syntax: IMPLICIT_VR_LE.to_string(),
            }),
        }
    }

    let mut user_variables = vec![
        UserVariableItem::MaxLength(policy.max_pdu),
        UserVariableItem::ImplementationClassUID(crate::IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(crate::IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    if async_window {
        // One operation invoked and performed at a time (PS3.7 D.3.3.3): the
        // box answers each C-STORE only once it is durable.
        user_variables.push(UserVariableItem::Unknown(
            ASYNC_OPERATIONS_WINDOW,
            vec![0, 1, 0, 1],
        ));
    }
    Ok(Accepted {
        ac: AssociationAC {
            protocol_version: 1,
            calling_ae_title: rq.calling_ae_title.clone(),
            called_ae_title: rq.called_ae_title.clone(),
            application_context_name: APPLICATION_CONTEXT.to_string(),
            presentation_contexts: results,
            user_variables,
        },
        contexts,
        peer_max_pdu,
        calling_ae: calling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    #[derive(Debug)]
    struct Only(IpAddr);
    impl AddressMatch for Only {
        fn matches(&self, ip: IpAddr) -> bool {
            ip == self.0
        }
    }

    fn rq(calling: &str, called: &str, contexts: Vec<(&str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling.into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: contexts
                .into_iter()
                .enumerate()
                .map(|(i, (a, ts))| PresentationContextProposed {
                    id: (i * 2 + 1) as u8,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn policy(only: Option<IpAddr>) -> Policy {
        Policy {
            ae_title: "KAKEHASHI".into(),
            sources: vec![SourceRule {
                ae_title: "MOD".into(),
                address: only.map(|ip| Box::new(Only(ip)) as Box<dyn AddressMatch>),
            }],
            max_pdu: 65536,
            sources_key: "dicom.sources",
            storage_classes: None,
            query_retrieve: false,
        }
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn accepts_first_offered_syntax_of_any_storage_class() {
        let r = rq(
            "MOD",
            "KAKEHASHI",
            vec![
                (
                    "1.2.840.10008.5.1.4.1.1.2",
                    vec!["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2"],
                ),
                ("1.2.840.10008.5.1.4.1.1.4", vec!["1.2.840.10008.1.2.1.99"]),
                ("1.3.12.2.1107.5.9.1", vec!["1.2.3.4.5.6.7"]), // private class, private syntax
                ("1.2.840.10008.5.1.4.1.2.2.1", vec!["1.2.840.10008.1.2"]), // C-FIND: not a relay service
                (
                    "1.2.840.10008.1.1",
                    vec!["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
                ),
            ],
        );
        let a = negotiate(&r, LOCAL, &policy(None), false).expect("accepted");
        let ts: Vec<_> = a
            .contexts
            .iter()
            .map(|c| (c.id, c.transfer_syntax.as_str()))
            .collect();
        assert_eq!(
            ts,
            vec![
                (1, "1.2.840.10008.1.2.4.90"),
                (3, "1.2.840.10008.1.2.1.99"),
                (5, "1.2.3.4.5.6.7"),
                (9, "1.2.840.10008.1.2")
            ]
        );
        assert_eq!(
            a.ac.presentation_contexts[3].reason,
            PresentationContextResultReason::AbstractSyntaxNotSupported
        );
        assert_eq!(a.peer_max_pdu, 16384);
    }

    #[test]
    fn a_restricted_listener_accepts_only_its_storage_classes() {
        let r = rq(
            "MOD",
            "KAKEHASHI",
            vec![
                ("1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2.1"]), // CT
                ("1.2.840.10008.5.1.4.1.1.104.1", vec!["1.2.840.10008.1.2.1"]), // PDF
                ("1.2.840.10008.1.1", vec!["1.2.840.10008.1.2"]),
            ],
        );
        let mut p = policy(None);
        p.storage_classes = Some(vec!["1.2.840.10008.5.1.4.1.1.104.1".into()]);
        p.sources_key = "results.from";
        let a = negotiate(&r, LOCAL, &p, false).expect("accepted");
        let ids: Vec<u8> = a.contexts.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![3, 5]);
        assert_eq!(
            a.ac.presentation_contexts[0].reason,
            PresentationContextResultReason::AbstractSyntaxNotSupported
        );
        let e = negotiate(&rq("STRANGER", "KAKEHASHI", vec![]), LOCAL, &p, false).expect_err("rj");
        assert!(e.reason.contains("results.from"), "{}", e.reason);
    }

    #[test]
    fn rejects_unknown_calling_and_called_titles() {
        let e = negotiate(
            &rq("STRANGER", "KAKEHASHI", vec![]),
            LOCAL,
            &policy(None),
            false,
        )
        .expect_err("rj");
        assert_eq!(
            e.rj.source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized
            )
        );
        assert_eq!(e.rj.result, AssociationRJResult::Permanent);
        let e =
            negotiate(&rq("MOD", "SOMEONE", vec![]), LOCAL, &policy(None), false).expect_err("rj");
        assert_eq!(
            e.rj.source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized
            )
        );
    }

    #[test]
    fn address_restriction_applies() {
        let other: IpAddr = "10.1.2.3".parse().expect("ip");
        let e = negotiate(
            &rq("MOD", "KAKEHASHI", vec![]),
            LOCAL,
            &policy(Some(other)),
            false,
        )
        .expect_err("rj");
        assert!(
            e.reason.contains("not allowed from address 127.0.0.1"),
            "{}",
            e.reason
        );
        assert!(negotiate(
            &rq("MOD", "KAKEHASHI", vec![]),
            other,
            &policy(Some(other)),
            false
        )
        .is_ok());
    }

    #[test]
    fn an_asynchronous_operations_window_is_answered_with_one() {
        let mut r = rq(
            "MOD",
            "KAKEHASHI",
            vec![("1.2.840.10008.1.1", vec![IMPLICIT_VR_LE])],
        );
        r.user_variables.push(UserVariableItem::Unknown(
            ASYNC_OPERATIONS_WINDOW,
            vec![0, 8, 0, 8],
        ));
        let a = negotiate(&r, LOCAL, &policy(None), false).expect("accepted");
        assert!(a.ac.user_variables.contains(&UserVariableItem::Unknown(
            ASYNC_OPERATIONS_WINDOW,
            vec![0, 1, 0, 1]
        )));
        let plain = rq("MOD", "KAKEHASHI", vec![]);
        let a = negotiate(&plain, LOCAL, &policy(None), false).expect("accepted");
        assert!(!a
            .ac
            .user_variables
            .iter()
            .any(|v| matches!(v, UserVariableItem::Unknown(ASYNC_OPERATIONS_WINDOW, _))));
    }

    #[test]
    fn capacity_rejection_is_transient() {
        let e =
            negotiate(&rq("MOD", "KAKEHASHI", vec![]), LOCAL, &policy(None), true).expect_err("rj");
        assert_eq!(e.rj.result, AssociationRJResult::Transient);
    }
}
