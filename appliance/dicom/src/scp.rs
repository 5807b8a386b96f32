//! The storage SCP's side of an established association, as a plain state
//! machine: presentation data values and a few events go in, [`Action`]s come
//! out. It never touches a socket or a disk; the daemon's ingress moves the
//! bytes and carries out the actions, and a fuzz target drives it directly.
//!
//! The rules it keeps:
//! - a command and its dataset travel on one presentation context, one that
//!   was accepted; data on another context is a protocol error (A-ABORT);
//! - the response goes out on the context of its request;
//! - one operation at a time (we negotiate an asynchronous operations
//!   window of 1): a C-STORE is answered only after its dataset is
//!   committed ([`Scp::stored`]), and nothing else is read meanwhile;
//! - an instance that cannot be accepted (invalid UID, SOP class not that of
//!   its context) has its dataset read and dropped, then is answered with a
//!   failure status: the association survives a refusal.

use bytes::Bytes;

use crate::dimse::{self, status, Command};
use crate::negotiate::AcceptedContext;
use crate::scan;
use crate::wire::Pdv;

/// Command sets are small; a peer that sends more is not speaking DICOM.
pub const MAX_COMMAND: usize = 64 * 1024;

/// A C-STORE about to be received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    pub message_id: u16,
    pub context: AcceptedContext,
    pub sop_instance: String,
    /// The DIMSE Priority field (0000,0700): 0 medium, 1 high, 2 low.
    pub priority: u16,
    /// Move Originator AE Title (0000,1030), when a C-MOVE caused this store.
    pub move_originator: Option<String>,
    /// Move Originator Message ID (0000,1031).
    pub move_originator_id: Option<u16>,
}

/// A C-FIND or C-MOVE from the peer (on a port that accepts them), with
/// its identifier as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRequest {
    pub message_id: u16,
    pub context: AcceptedContext,
    pub priority: u16,
    /// `None` for a C-FIND; the Move Destination AE title for a C-MOVE.
    pub move_destination: Option<String>,
    /// The identifier dataset, in the context's transfer syntax.
    pub identifier: Vec<u8>,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this command set on presentation context `pc`.
    Command { pc: u8, bytes: Vec<u8> },
    /// A C-STORE begins: open a spool file for it.
    StoreBegin(StoreRequest),
    /// The next bytes of the current C-STORE's dataset.
    StoreData(Bytes),
    /// The dataset is complete: commit it and report with [`Scp::stored`];
    /// `keys` were read from its first bytes.
    StoreEnd {
        keys: scan::RoutingKeys,
        /// For SRs and encapsulated documents: what the report says of itself.
        report: Option<Box<scan::ReportFacts>>,
    },
    /// An instance refused without reaching the spool (log and audit it);
    /// its response follows as a [`Action::Command`].
    Refused {
        sop_instance: String,
        status: u16,
        comment: String,
    },
    /// Answer this query or retrieval (responses on its context), then
    /// call [`Scp::answered`].
    Query(QueryRequest),
    /// Answer the A-RELEASE-RQ with A-RELEASE-RP and close.
    Release,
    /// A protocol error: send A-ABORT and close.
    Abort(String),
}

#[derive(Debug)]
enum State {
    Idle,
    /// A command set arriving in fragments on `pc`.
    Command {
        pc: u8,
        bytes: Vec<u8>,
    },
    Receiving {
        request: StoreRequest,
        prefix: Vec<u8>,
    },
    /// The dataset is read and dropped; then the sender gets `status`.
    Discarding {
        pc: u8,
        message_id: u16,
        sop_class: String,
        sop_instance: String,
        status: u16,
        comment: String,
    },
    /// Waiting for [`Scp::stored`].
    Committing {
        request: StoreRequest,
    },
    /// A C-FIND/C-MOVE identifier arriving.
    Identifier {
        request: QueryRequest,
    },
    /// Waiting for [`Scp::answered`].
    Answering,
    /// Released or aborted: nothing more.
    Closed,
}

/// One association as the SCP sees it.
#[derive(Debug)]
pub struct Scp {
    contexts: Vec<AcceptedContext>,
    state: State,
}

impl Scp {
    pub fn new(contexts: Vec<AcceptedContext>) -> Scp {
        Scp {
            contexts,
            state: State::Idle,
        }
    }

    /// Nothing is half done: no command or dataset is in transfer.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    fn fail(&mut self, why: impl Into<String>) -> Vec<Action> {
        self.state = State::Closed;
        vec![Action::Abort(why.into())]
    }

    /// One presentation data value, as it arrived.
    pub fn on_pdv(&mut self, pdv: Pdv) -> Vec<Action> {
        if !self.contexts.iter().any(|c| c.id == pdv.pc_id) {
            return self.fail(format!(
                "data on presentation context {}, which was not accepted",
                pdv.pc_id
            ));
        }
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Closed => vec![Action::Abort("data after the association ended".into())],
            State::Committing { .. } => self.fail("data before the previous C-STORE was answered"),
            State::Answering => self.fail("data before the previous query was answered"),
            State::Identifier { mut request } => {
                if pdv.command || pdv.pc_id != request.context.id {
                    return self.fail(format!(
                        "{} on presentation context {} during the identifier of a request on context {}",
                        if pdv.command { "command" } else { "data" },
                        pdv.pc_id,
                        request.context.id
                    ));
                }
                request.identifier.extend_from_slice(&pdv.data);
                if request.identifier.len() > MAX_COMMAND {
                    return self.fail(format!("identifier larger than {MAX_COMMAND} bytes"));
                }
                if pdv.last {
                    self.state = State::Answering;
                    vec![Action::Query(request)]
                } else {
                    self.state = State::Identifier { request };
                    Vec::new()
                }
            }
            State::Idle if !pdv.command => self.fail("dataset fragment without a command"),
            State::Idle => self.command_fragment(pdv.pc_id, Vec::new(), pdv),
            State::Command { pc, bytes } if pdv.command && pdv.pc_id == pc => {
                self.command_fragment(pc, bytes, pdv)
            }
            State::Command { pc, .. } => self.fail(format!(
                "{} on presentation context {} in the middle of a command on context {pc}",
                if pdv.command { "command" } else { "data" },
                pdv.pc_id
            )),
            State::Receiving { request, prefix } => self.data(request, prefix, pdv),
            State::Discarding { pc, .. } if pdv.pc_id != pc || pdv.command => self.fail(format!(
                "{} on presentation context {} where the dataset of a command on context {pc} was expected",
                if pdv.command { "command" } else { "data" },
                pdv.pc_id
            )),
            discarding @ State::Discarding { .. } => {
                if !pdv.last {
                    self.state = discarding;
                    return Vec::new();
                }
                let State::Discarding {
                    pc,
                    message_id,
                    sop_class,
                    sop_instance,
                    status,
                    comment,
                } = discarding
                else {
                    unreachable!("matched above")
                };
                self.state = State::Idle;
                vec![
                    Action::Refused {
                        sop_instance: sop_instance.clone(),
                        status,
                        comment: comment.clone(),
                    },
                    Action::Command {
                        pc,
                        bytes: dimse::c_store_rsp(
                            message_id,
                            &sop_class,
                            &sop_instance,
                            status,
                            Some(&comment),
                        ),
                    },
                ]
            }
        }
    }

    fn command_fragment(&mut self, pc: u8, mut bytes: Vec<u8>, pdv: Pdv) -> Vec<Action> {
        bytes.extend_from_slice(&pdv.data);
        if bytes.len() > MAX_COMMAND {
            return self.fail(format!("command set larger than {MAX_COMMAND} bytes"));
        }
        if !pdv.last {
            self.state = State::Command { pc, bytes };
            return Vec::new();
        }
        self.on_command(pc, &bytes)
    }

    fn on_command(&mut self, pc_id: u8, bytes: &[u8]) -> Vec<Action> {
        let cmd = match Command::parse(bytes) {
            Ok(c) => c,
            Err(e) => return self.fail(format!("bad command set: {e}")),
        };
        let field = match cmd.command_field() {
            Ok(f) => f,
            Err(e) => return self.fail(e.to_string()),
        };
        let message_id = cmd.message_id().unwrap_or(0);
        // Checked by on_pdv: the context was accepted.
        let Some(pc) = self.contexts.iter().find(|c| c.id == pc_id).cloned() else {
            return self.fail(format!("presentation context {pc_id} was not accepted"));
        };
        match field {
            dimse::C_ECHO_RQ => {
                self.state = State::Idle;
                vec![Action::Command {
                    pc: pc_id,
                    bytes: dimse::c_echo_rsp(message_id),
                }]
            }
            dimse::C_STORE_RQ => {
                if !cmd.has_dataset() {
                    return self.fail("C-STORE-RQ without a dataset");
                }
                let sop_class = cmd
                    .affected_sop_class()
                    .unwrap_or_else(|| pc.abstract_syntax.clone());
                let sop_instance = cmd.affected_sop_instance().unwrap_or_default();
                let refusal = if !crate::uids::is_valid_uid(&sop_instance) {
                    Some("missing or invalid Affected SOP Instance UID")
                } else if sop_class != pc.abstract_syntax {
                    Some("the SOP class differs from its presentation context's")
                } else {
                    None
                };
                if let Some(why) = refusal {
                    self.state = State::Discarding {
                        pc: pc_id,
                        message_id,
                        sop_class,
                        sop_instance,
                        status: status::CANNOT_UNDERSTAND,
                        comment: why.into(),
                    };
                    return Vec::new();
                }
                let request = StoreRequest {
                    message_id,
                    context: pc,
                    sop_instance,
                    priority: cmd.priority(),
                    move_originator: cmd.move_originator(),
                    move_originator_id: cmd.move_originator_id(),
                };
                self.state = State::Receiving {
                    request: request.clone(),
                    prefix: Vec::new(),
                };
                vec![Action::StoreBegin(request)]
            }
            dimse::C_FIND_RQ | dimse::C_MOVE_RQ => {
                let wanted = if field == dimse::C_FIND_RQ {
                    crate::query::STUDY_ROOT_FIND
                } else {
                    crate::query::STUDY_ROOT_MOVE
                };
                if pc.abstract_syntax != wanted {
                    return self.fail(format!(
                        "{} on presentation context {pc_id}, which is for {}",
                        if field == dimse::C_FIND_RQ {
                            "C-FIND"
                        } else {
                            "C-MOVE"
                        },
                        pc.abstract_syntax
                    ));
                }
                if !cmd.has_dataset() {
                    return self.fail("C-FIND/C-MOVE request without an identifier");
                }
                self.state = State::Identifier {
                    request: QueryRequest {
                        message_id,
                        context: pc,
                        priority: cmd.priority(),
                        move_destination: if field == dimse::C_MOVE_RQ {
                            Some(cmd.move_destination().unwrap_or_default())
                        } else {
                            None
                        },
                        identifier: Vec::new(),
                    },
                };
                Vec::new()
            }
            // A cancel for a request already answered: nothing to do.
            dimse::C_CANCEL_RQ => {
                self.state = State::Idle;
                Vec::new()
            }
            other => self.fail(format!(
                "unsupported DIMSE command 0x{other:04X} (this port accepts C-ECHO and C-STORE)"
            )),
        }
    }

    /// The driver has sent the last response to the current query.
    pub fn answered(&mut self) {
        if matches!(self.state, State::Answering) {
            self.state = State::Idle;
        }
    }

    fn data(&mut self, request: StoreRequest, mut prefix: Vec<u8>, pdv: Pdv) -> Vec<Action> {
        if pdv.command || pdv.pc_id != request.context.id {
            return self.fail(format!(
                "{} on presentation context {} during the dataset of a C-STORE on context {}",
                if pdv.command { "command" } else { "data" },
                pdv.pc_id,
                request.context.id
            ));
        }
        if prefix.len() < scan::SCAN_LIMIT {
            let take = (scan::SCAN_LIMIT - prefix.len()).min(pdv.data.len());
            prefix.extend_from_slice(&pdv.data[..take]);
        }
        let mut actions = vec![Action::StoreData(pdv.data)];
        if pdv.last {
            let keys = scan::routing_keys(&request.context.transfer_syntax, &prefix);
            let class = request.context.abstract_syntax.as_str();
            let report = (class.starts_with("1.2.840.10008.5.1.4.1.1.88.")
                || class.starts_with("1.2.840.10008.5.1.4.1.1.104."))
            .then(|| {
                Box::new(scan::report_facts(
                    &request.context.transfer_syntax,
                    &prefix,
                ))
            });
            actions.push(Action::StoreEnd { keys, report });
            self.state = State::Committing { request };
        } else {
            self.state = State::Receiving { request, prefix };
        }
        actions
    }

    /// The outcome of the commit asked for by [`Action::StoreEnd`]: the
    /// response, on the request's own presentation context.
    pub fn stored(&mut self, code: u16, comment: Option<&str>) -> Vec<Action> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Committing { request } => vec![Action::Command {
                pc: request.context.id,
                bytes: dimse::c_store_rsp(
                    request.message_id,
                    &request.context.abstract_syntax,
                    &request.sop_instance,
                    code,
                    comment,
                ),
            }],
            other => {
                self.state = other;
                self.fail("a store outcome without a C-STORE being committed")
            }
        }
    }

    /// A-RELEASE-RQ from the peer.
    pub fn on_release(&mut self) -> Vec<Action> {
        if !self.is_idle() {
            return self.fail("A-RELEASE-RQ in the middle of an operation");
        }
        self.state = State::Closed;
        vec![Action::Release]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT: &str = "1.2.840.10008.1.2";

    fn scp() -> Scp {
        Scp::new(vec![
            AcceptedContext {
                id: 1,
                abstract_syntax: CT.into(),
                transfer_syntax: EXPLICIT.into(),
            },
            AcceptedContext {
                id: 3,
                abstract_syntax: CT.into(),
                transfer_syntax: IMPLICIT.into(),
            },
            AcceptedContext {
                id: 5,
                abstract_syntax: crate::uids::VERIFICATION.into(),
                transfer_syntax: IMPLICIT.into(),
            },
            AcceptedContext {
                id: 7,
                abstract_syntax: crate::query::STUDY_ROOT_FIND.into(),
                transfer_syntax: IMPLICIT.into(),
            },
        ])
    }

    fn pdv(pc: u8, command: bool, last: bool, data: &[u8]) -> Pdv {
        Pdv {
            pc_id: pc,
            command,
            last,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn response_pc(actions: &[Action]) -> Option<u8> {
        actions.iter().find_map(|a| match a {
            Action::Command { pc, .. } => Some(*pc),
            _ => None,
        })
    }

    #[test]
    fn the_response_goes_out_on_the_request_context() {
        // Two contexts for one SOP class (one per transfer syntax), the
        // second one used: the answer must come on 3, not on 1.
        let mut s = scp();
        let rq = dimse::c_store_rq(7, CT, "1.2.3.4", 0);
        let a = s.on_pdv(pdv(3, true, true, &rq));
        let Some(Action::StoreBegin(r)) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(r.context.transfer_syntax, IMPLICIT);
        let a = s.on_pdv(pdv(3, false, false, b"abcd"));
        assert_eq!(a, vec![Action::StoreData(Bytes::from_static(b"abcd"))]);
        let a = s.on_pdv(pdv(3, false, true, b"ef"));
        assert!(matches!(a.last(), Some(Action::StoreEnd { .. })), "{a:?}");
        let a = s.stored(0, None);
        assert_eq!(response_pc(&a), Some(3));
        let Action::Command { bytes, .. } = &a[0] else {
            panic!()
        };
        let rsp = Command::parse(bytes).expect("rsp");
        assert_eq!(rsp.responded_to(), Some(7));
        assert_eq!(rsp.status(), Some(0));
        assert!(s.is_idle());
    }

    #[test]
    fn data_on_another_context_than_its_command_is_a_protocol_error() {
        let mut s = scp();
        s.on_pdv(pdv(3, true, true, &dimse::c_store_rq(1, CT, "1.2.3", 0)));
        let a = s.on_pdv(pdv(1, false, true, b"x"));
        assert!(matches!(a.as_slice(), [Action::Abort(_)]), "{a:?}");
        let mut s = scp();
        let a = s.on_pdv(pdv(9, true, true, &dimse::c_echo_rq(1)));
        assert!(matches!(a.as_slice(), [Action::Abort(_)]), "{a:?}");
    }

    #[test]
    fn a_refused_instance_is_answered_on_its_context_and_the_association_goes_on() {
        let mut s = scp();
        let a = s.on_pdv(pdv(
            3,
            true,
            true,
            &dimse::c_store_rq(4, "1.2.840.10008.5.1.4.1.1.4", "1.2.3", 0),
        ));
        assert!(a.is_empty(), "{a:?}");
        assert!(s.on_pdv(pdv(3, false, false, b"drop")).is_empty());
        let a = s.on_pdv(pdv(3, false, true, b"drop"));
        assert!(
            matches!(a[0], Action::Refused { status: 0xC000, .. }),
            "{a:?}"
        );
        assert_eq!(response_pc(&a), Some(3));
        let a = s.on_pdv(pdv(5, true, true, &dimse::c_echo_rq(2)));
        assert_eq!(response_pc(&a), Some(5));
    }

    #[test]
    fn fragmented_commands_and_release() {
        let mut s = scp();
        let rq = dimse::c_echo_rq(9);
        assert!(s.on_pdv(pdv(5, true, false, &rq[..10])).is_empty());
        let a = s.on_pdv(pdv(5, true, true, &rq[10..]));
        assert_eq!(response_pc(&a), Some(5));
        assert_eq!(s.on_release(), vec![Action::Release]);
        let mut s = scp();
        s.on_pdv(pdv(1, true, true, &dimse::c_store_rq(1, CT, "1.2.3", 0)));
        assert!(matches!(s.on_release().as_slice(), [Action::Abort(_)]));
    }

    #[test]
    fn a_query_is_handed_over_whole_and_nothing_is_read_until_it_is_answered() {
        let mut s = scp();
        let find = dimse::c_find_rq(4, crate::query::STUDY_ROOT_FIND, 0);
        // A C-FIND on a storage context is a protocol error.
        let mut wrong = scp();
        assert!(matches!(
            wrong.on_pdv(pdv(1, true, true, &find)).as_slice(),
            [Action::Abort(_)]
        ));
        assert!(s.on_pdv(pdv(7, true, true, &find)).is_empty());
        assert!(s.on_pdv(pdv(7, false, false, b"abcd")).is_empty());
        let a = s.on_pdv(pdv(7, false, true, b"ef"));
        let [Action::Query(q)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(
            (q.message_id, q.context.id, q.move_destination.clone()),
            (4, 7, None)
        );
        assert_eq!(q.identifier, b"abcdef");
        // Answering: another command now is a protocol error.
        let mut busy = std::mem::replace(&mut s, scp());
        let echo = dimse::c_echo_rq(5);
        assert!(matches!(
            busy.on_pdv(pdv(5, true, true, &echo)).as_slice(),
            [Action::Abort(_)]
        ));
        // Answered: the association goes on; a late C-CANCEL is ignored.
        let mut s = scp();
        s.on_pdv(pdv(7, true, true, &find));
        s.on_pdv(pdv(7, false, true, b"ab"));
        s.answered();
        assert!(s.is_idle());
        let mut cancel = dimse::c_echo_rq(4);
        // (0000,0100) Command Field of the echo, patched to C-CANCEL-RQ.
        let at = cancel
            .windows(2)
            .position(|w| w == [0x30, 0x00])
            .expect("field");
        cancel[at..at + 2].copy_from_slice(&dimse::C_CANCEL_RQ.to_le_bytes());
        assert!(s.on_pdv(pdv(7, true, true, &cancel)).is_empty());
        assert_eq!(response_pc(&s.on_pdv(pdv(5, true, true, &echo))), Some(5));
    }
}
