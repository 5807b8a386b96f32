//! The SCU: one association, one operation at a time. C-STORE (the
//! forwarder: datasets streamed from any `AsyncRead` in PDU-sized
//! fragments), C-ECHO (the self-test), C-FIND and C-MOVE (prefetching priors
//! from the hospital's PACS).
//!
//! Every network step has a timeout, so a peer that stops reading or
//! answering cannot hang the caller: each write of a PDU and each wait for
//! an answer gets `response_timeout`; release and abort get 5 s. While a
//! C-STORE is in flight the clock counts time without progress, not time:
//! a fragment's write and the wait for the C-STORE-RSP go on as long as the
//! peer keeps acknowledging bytes of the connection's send queue
//! ([`crate::sendq`]). The tail of a large instance may sit in socket
//! buffers for longer than `response_timeout` over a slow link, and the
//! peer can only answer once it has it all; a peer that stops reading or
//! acknowledging still times out `response_timeout` after its last byte.

use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJResult, AssociationRQ, PDataValueType, Pdu,
    PresentationContextProposed, PresentationContextResultReason, UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::dimse::{self, Command};
use crate::negotiate::AcceptedContext;
use crate::uids::{APPLICATION_CONTEXT, IMPLICIT_VR_LE, VERIFICATION};
use crate::wire::{self, WireError, PDATA_OVERHEAD};

#[derive(Debug, Clone)]
pub struct ScuOptions {
    pub calling_ae: String,
    pub called_ae: String,
    /// Largest PDU we accept from the peer.
    pub max_pdu: u32,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {peer} within {after:?} while {what}")]
    Timeout {
        peer: String,
        what: &'static str,
        after: Duration,
    },
    #[error("association rejected by {peer} ({}): {reason}", if *.permanent { "permanent" } else { "transient" })]
    Rejected {
        peer: String,
        reason: String,
        permanent: bool,
    },
    #[error("association aborted by {peer}: {reason}")]
    Aborted { peer: String, reason: String },
    #[error("protocol error with {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("connection to {peer} failed: {source}")]
    Wire {
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("cannot read the dataset to send: {0}")]
    Source(std::io::Error),
}

#[derive(Debug)]
pub struct Scu {
    peer: String,
    stream: TcpStream,
    buf: BytesMut,
    contexts: Vec<AcceptedContext>,
    peer_max_pdu: u32,
    our_max_pdu: u32,
    next_id: u16,
    response_timeout: Duration,
    /// (local, peer) of the connection, to find its send queue.
    conn: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    frame: Vec<u8>,
    message_reader: MessageReader,
    messages: std::collections::VecDeque<Message>,
}

impl Scu {
    /// Resolves `address` (host:port) afresh, connects and negotiates the
    /// given (abstract syntax, transfer syntax) pairs, one context each.
    pub async fn connect(
        address: &str,
        opts: &ScuOptions,
        proposed: &[(String, String)],
    ) -> Result<Scu, ScuError> {
        let addrs = resolve(address, opts.connect_timeout).await?;
        Scu::connect_to(address, &addrs, opts, proposed).await
    }

    /// Connects to the first of `addrs` that answers (what `address`
    /// resolved to: the caller may have checked them) and negotiates.
    pub async fn connect_to(
        address: &str,
        addrs: &[std::net::SocketAddr],
        opts: &ScuOptions,
        proposed: &[(String, String)],
    ) -> Result<Scu, ScuError> {
        Scu::connect_with_roles(address, addrs, opts, proposed, &[]).await
    }

    /// Like [`Scu::connect_to`], also proposing to be the SCP of the storage
    /// classes `scp_of` (SCP/SCU Role Selection, PS3.7 D.3.3.4): what C-GET
    /// needs, since the peer sends its instances on this association.
    pub async fn connect_with_roles(
        address: &str,
        addrs: &[std::net::SocketAddr],
        opts: &ScuOptions,
        proposed: &[(String, String)],
        scp_of: &[String],
    ) -> Result<Scu, ScuError> {
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match timeout(opts.connect_timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("timed out after {:?}", opts.connect_timeout),
                    ))
                }
            }
        }
        let Some(mut stream) = stream else {
            return Err(ScuError::Connect {
                address: address.to_string(),
                source: last
                    .unwrap_or_else(|| std::io::Error::other("name resolved to no address")),
            });
        };
        let _ = stream.set_nodelay(true);
        let peer = format!("{}@{}", opts.called_ae, address);
        let conn = stream.local_addr().ok().zip(stream.peer_addr().ok());

        let mut contexts: Vec<PresentationContextProposed> = proposed
            .iter()
            .take(127)
            .enumerate()
            .map(|(i, (a, t))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: a.clone(),
                transfer_syntaxes: vec![t.clone()],
            })
            .collect();
        if contexts.is_empty() {
            contexts.push(PresentationContextProposed {
                id: 1,
                abstract_syntax: VERIFICATION.into(),
                transfer_syntaxes: vec![IMPLICIT_VR_LE.into()],
            });
        }
        let rq = Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: opts.calling_ae.clone(),
            called_ae_title: opts.called_ae.clone(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: contexts.clone(),
            user_variables: [
                UserVariableItem::MaxLength(opts.max_pdu),
                UserVariableItem::ImplementationClassUID(crate::IMPLEMENTATION_CLASS_UID.into()),
                UserVariableItem::ImplementationVersionName(
                    crate::IMPLEMENTATION_VERSION_NAME.into(),
                ),
            ]
            .into_iter()
            .chain(scp_of.iter().map(|class| {
                UserVariableItem::ScuScpRoleSelectionSubItem(
                    class.clone(),
                    dicom_ul::pdu::RequestorRoles {
                        scu: false,
                        scp: true,
                    },
                )
            }))
            .collect(),
        });
        within(
            &peer,
            "sending the A-ASSOCIATE-RQ",
            opts.response_timeout,
            wire::write_pdu(&mut stream, &rq),
        )
        .await?;
        let mut buf = BytesMut::new();
        let reply = timeout(
            opts.response_timeout,
            wire::read_pdu(&mut stream, &mut buf, opts.max_pdu),
        )
        .await
        .map_err(|_| ScuError::Timeout {
            peer: peer.clone(),
            what: "negotiating the association",
            after: opts.response_timeout,
        })?
        .map_err(|source| ScuError::Wire {
            peer: peer.clone(),
            source,
        })?;
        let Negotiated {
            contexts,
            peer_max_pdu,
        } = negotiated(reply, &contexts, &peer)?;
        Ok(Scu {
            peer,
            stream,
            buf,
            contexts,
            peer_max_pdu,
            our_max_pdu: opts.max_pdu,
            next_id: 1,
            response_timeout: opts.response_timeout,
            conn,
            frame: Vec::new(),
            message_reader: MessageReader::default(),
            messages: Default::default(),
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The context accepted for exactly this SOP class and transfer syntax.
    pub fn context_for(&self, sop_class: &str, transfer_syntax: &str) -> Option<u8> {
        self.contexts
            .iter()
            .find(|c| c.abstract_syntax == sop_class && c.transfer_syntax == transfer_syntax)
            .map(|c| c.id)
    }

    fn next_message_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Sends one C-STORE and returns the response status and error comment.
    /// `progress` is called with the dataset bytes sent so far after each
    /// fragment, and while the peer acknowledges the rest of the send queue
    /// (the caller's sign of life).
    #[allow(clippy::too_many_arguments)]
    pub async fn store<R: AsyncRead + Unpin>(
        &mut self,
        pc_id: u8,
        sop_class: &str,
        sop_instance: &str,
        priority: u16,
        mut data: R,
        size: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<(u16, Option<String>), ScuError> {
        let id = self.next_message_id();
        let after = self.response_timeout;
        let command = dimse::c_store_rq(id, sop_class, sop_instance, priority);
        within(
            &self.peer,
            "sending a C-STORE-RQ",
            after,
            wire::send_command(&mut self.stream, pc_id, &command),
        )
        .await?;
        let max_fragment = match self.peer_max_pdu {
            0 => 1 << 20,
            n => (n.min(1 << 20) as usize).saturating_sub(6).max(2) & !1,
        };
        let mut remaining = size;
        loop {
            let n = remaining.min(max_fragment as u64) as usize;
            self.frame.resize(PDATA_OVERHEAD + n, 0);
            data.read_exact(&mut self.frame[PDATA_OVERHEAD..])
                .await
                .map_err(ScuError::Source)?;
            let before = size - remaining;
            remaining -= n as u64;
            wire::frame_pdata(&mut self.frame, pc_id, false, remaining == 0);
            // In slices: a slice the kernel takes is progress (the peer
            // acknowledged room for it), so a PDU larger than the socket
            // buffers never counts as one step over a slow link.
            let mut offset = 0;
            for slice in self.frame.chunks(WRITE_SLICE) {
                offset += slice.len();
                let sent = before + offset.saturating_sub(PDATA_OVERHEAD) as u64;
                let write = async { self.stream.write_all(slice).await.map_err(WireError::Io) };
                until_stalled(
                    &self.peer,
                    "sending data (the peer stopped reading)",
                    after,
                    self.conn,
                    write,
                    &mut || progress(before),
                )
                .await?;
                progress(sent);
            }
            if remaining == 0 {
                break;
            }
        }
        let mut reader = ResponseReader::default();
        let what = "waiting for C-STORE-RSP";
        let rsp = loop {
            let read = wire::read_pdu(&mut self.stream, &mut self.buf, self.our_max_pdu);
            let pdu = until_stalled(&self.peer, what, after, self.conn, read, &mut || {
                progress(size)
            })
            .await?;
            if let Some(command) = reader.push(pdu, &self.peer, what)? {
                break command;
            }
        };
        if rsp.responded_to() != Some(id) || rsp.command_field().ok() != Some(dimse::C_STORE_RSP) {
            return Err(ScuError::Protocol {
                peer: self.peer.clone(),
                detail: format!("unexpected response to C-STORE {id}"),
            });
        }
        let status = rsp.status().ok_or_else(|| ScuError::Protocol {
            peer: self.peer.clone(),
            detail: "C-STORE-RSP without status".into(),
        })?;
        Ok((status, rsp.error_comment()))
    }

    /// Sends a C-ECHO on a Verification context (see [`Scu::context_for`]);
    /// returns the response status (0x0000 = the peer is alive and answers).
    pub async fn echo(&mut self, pc_id: u8) -> Result<u16, ScuError> {
        let id = self.next_message_id();
        within(
            &self.peer,
            "sending a C-ECHO-RQ",
            self.response_timeout,
            wire::send_command(&mut self.stream, pc_id, &dimse::c_echo_rq(id)),
        )
        .await?;
        let rsp = self.read_command("waiting for C-ECHO-RSP").await?;
        if rsp.responded_to() != Some(id) || rsp.command_field().ok() != Some(dimse::C_ECHO_RSP) {
            return Err(ScuError::Protocol {
                peer: self.peer.clone(),
                detail: format!("unexpected response to C-ECHO {id}"),
            });
        }
        rsp.status().ok_or_else(|| ScuError::Protocol {
            peer: self.peer.clone(),
            detail: "C-ECHO-RSP without status".into(),
        })
    }

    /// The next PDU, within `response_timeout`.
    async fn read_pdu(&mut self, what: &'static str) -> Result<Pdu, ScuError> {
        timeout(
            self.response_timeout,
            wire::read_pdu(&mut self.stream, &mut self.buf, self.our_max_pdu),
        )
        .await
        .map_err(|_| ScuError::Timeout {
            peer: self.peer.clone(),
            what,
            after: self.response_timeout,
        })?
        .map_err(|source| ScuError::Wire {
            peer: self.peer.clone(),
            source,
        })
    }

    async fn read_command(&mut self, what: &'static str) -> Result<Command, ScuError> {
        let mut reader = ResponseReader::default();
        loop {
            let pdu = self.read_pdu(what).await?;
            if let Some(command) = reader.push(pdu, &self.peer, what)? {
                return Ok(command);
            }
        }
    }

    /// C-FIND on context `pc_id` (a query model of `sop_class`): every
    /// pending answer's identifier, and the final status.
    pub async fn find(
        &mut self,
        pc_id: u8,
        sop_class: &str,
        identifier: &crate::query::Identifier,
    ) -> Result<(u16, Vec<crate::query::Identifier>), ScuError> {
        let (status, raw) = self
            .find_raw(pc_id, sop_class, &identifier.encode())
            .await?;
        let answers = raw
            .iter()
            .map(|d| {
                crate::query::Identifier::decode(d).ok_or_else(|| ScuError::Protocol {
                    peer: self.peer.clone(),
                    detail: "a C-FIND answer is not a readable dataset".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((status, answers))
    }

    /// C-FIND with an identifier as bytes; the answers as the peer sent
    /// them (to pass them on unchanged), and the final status.
    pub async fn find_raw(
        &mut self,
        pc_id: u8,
        sop_class: &str,
        identifier: &[u8],
    ) -> Result<(u16, Vec<Vec<u8>>), ScuError> {
        let id = self.next_message_id();
        self.send_request(
            pc_id,
            &dimse::c_find_rq(id, sop_class, 0),
            identifier,
            "sending a C-FIND-RQ",
        )
        .await?;
        let mut answers = Vec::new();
        loop {
            let (rsp, data, _) = self.read_message("waiting for C-FIND-RSP").await?;
            self.check_response(&rsp, id, dimse::C_FIND_RSP, "C-FIND")?;
            let status = rsp.status().unwrap_or(0xFFFF);
            if !dimse::is_pending(status) {
                return Ok((status, answers));
            }
            answers.extend(data);
        }
    }

    /// C-MOVE on context `pc_id` to AE `destination`; returns the final
    /// status and sub-operation counts, and the C-MOVE-RQ's message ID (the
    /// Move Originator Message ID of the C-STOREs it causes) is given to
    /// `started` before anything is sent. Waits up to `response_timeout`
    /// between responses (a PACS sends a pending response per instance).
    pub async fn retrieve(
        &mut self,
        pc_id: u8,
        sop_class: &str,
        destination: &str,
        identifier: &crate::query::Identifier,
        started: impl FnOnce(u16),
    ) -> Result<(u16, crate::query::SubOperations), ScuError> {
        let id = self.next_message_id();
        started(id);
        self.send_request(
            pc_id,
            &dimse::c_move_rq(id, sop_class, 0, destination),
            &identifier.encode(),
            "sending a C-MOVE-RQ",
        )
        .await?;
        loop {
            let (rsp, _failed_list, _) = self.read_message("waiting for C-MOVE-RSP").await?;
            self.check_response(&rsp, id, dimse::C_MOVE_RSP, "C-MOVE")?;
            let status = rsp.status().unwrap_or(0xFFFF);
            if !dimse::is_pending(status) {
                return Ok((status, rsp.sub_operations()));
            }
        }
    }

    /// Starts a C-GET on context `pc_id`; then [`Scu::get_next`] until it
    /// says the C-GET is done. Returns the request's message ID.
    pub async fn get_start(
        &mut self,
        pc_id: u8,
        sop_class: &str,
        identifier: &crate::query::Identifier,
    ) -> Result<u16, ScuError> {
        let id = self.next_message_id();
        self.send_request(
            pc_id,
            &dimse::c_get_rq(id, sop_class, 0),
            &identifier.encode(),
            "sending a C-GET-RQ",
        )
        .await?;
        Ok(id)
    }

    /// The next event of the C-GET `id`: an instance the peer stores here
    /// (answer it with [`Scu::store_response`]), or the final response.
    /// Waits up to `response_timeout` for each message.
    pub async fn get_next(&mut self, id: u16) -> Result<GetEvent, ScuError> {
        loop {
            let (cmd, data, pc) = self.read_message("waiting for C-GET").await?;
            match cmd.command_field() {
                Ok(dimse::C_STORE_RQ) => {
                    let Some(context) = self.contexts.iter().find(|c| c.id == pc).cloned() else {
                        return Err(ScuError::Protocol {
                            peer: self.peer.clone(),
                            detail: format!("a C-STORE on presentation context {pc}, not accepted"),
                        });
                    };
                    return Ok(GetEvent::Store {
                        pc,
                        message_id: cmd.message_id().unwrap_or(0),
                        sop_class: cmd.affected_sop_class().unwrap_or_default(),
                        sop_instance: cmd.affected_sop_instance().unwrap_or_default(),
                        transfer_syntax: context.transfer_syntax,
                        dataset: data.unwrap_or_default(),
                    });
                }
                _ => {
                    self.check_response(&cmd, id, dimse::C_GET_RSP, "C-GET")?;
                    let status = cmd.status().unwrap_or(0xFFFF);
                    if !dimse::is_pending(status) {
                        return Ok(GetEvent::Done {
                            status,
                            ops: cmd.sub_operations(),
                        });
                    }
                }
            }
        }
    }

    /// Answers a C-STORE the peer sent during a C-GET.
    pub async fn store_response(
        &mut self,
        pc: u8,
        message_id: u16,
        sop_class: &str,
        sop_instance: &str,
        status: u16,
    ) -> Result<(), ScuError> {
        let rsp = dimse::c_store_rsp(message_id, sop_class, sop_instance, status, None);
        within(
            &self.peer,
            "answering a C-STORE during C-GET",
            self.response_timeout,
            wire::send_command(&mut self.stream, pc, &rsp),
        )
        .await
    }

    async fn send_request(
        &mut self,
        pc_id: u8,
        command: &[u8],
        dataset: &[u8],
        what: &'static str,
    ) -> Result<(), ScuError> {
        let after = self.response_timeout;
        within(
            &self.peer,
            what,
            after,
            wire::send_command(&mut self.stream, pc_id, command),
        )
        .await?;
        within(
            &self.peer,
            what,
            after,
            wire::send_dataset(&mut self.stream, pc_id, dataset, self.peer_max_pdu),
        )
        .await?;
        Ok(())
    }

    fn check_response(
        &self,
        rsp: &Command,
        id: u16,
        field: u16,
        what: &str,
    ) -> Result<(), ScuError> {
        if rsp.responded_to() != Some(id) || rsp.command_field().ok() != Some(field) {
            return Err(ScuError::Protocol {
                peer: self.peer.clone(),
                detail: format!("unexpected response to {what} {id}"),
            });
        }
        Ok(())
    }

    /// One whole DIMSE message: its command, and its dataset if the
    /// command says one follows.
    async fn read_message(&mut self, what: &'static str) -> Result<Message, ScuError> {
        loop {
            if let Some(m) = self.messages.pop_front() {
                return Ok(m);
            }
            let pdu = self.read_pdu(what).await?;
            let done = self.message_reader.push(pdu, &self.peer, what)?;
            self.messages.extend(done);
        }
    }

    /// Orderly release, at most 5 s for each step (the connection is
    /// dropped anyway); errors are irrelevant at this point and ignored.
    pub async fn release(mut self) {
        let bound = Duration::from_secs(5);
        if let Ok(Ok(())) = timeout(bound, wire::write_pdu(&mut self.stream, &Pdu::ReleaseRQ)).await
        {
            let _ = timeout(
                bound,
                wire::read_pdu(&mut self.stream, &mut self.buf, self.our_max_pdu),
            )
            .await;
        }
        let _ = timeout(bound, self.stream.shutdown()).await;
    }

    /// A-ABORT, at most 5 s for each step; the connection is dropped anyway.
    pub async fn abort(mut self) {
        let bound = Duration::from_secs(5);
        let abort = Pdu::AbortRQ {
            source: AbortRQSource::ServiceUser,
        };
        let _ = timeout(bound, wire::write_pdu(&mut self.stream, &abort)).await;
        let _ = timeout(bound, self.stream.shutdown()).await;
    }
}

/// Runs one network step of `peer`, giving up after `after`.
/// The most written to the socket in one step of a C-STORE.
const WRITE_SLICE: usize = 64 * 1024;

/// How often a wait looks at the send queue.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// `step` until it ends, or until `after` has passed without the peer
/// acknowledging any of the connection's send queue (`conn`; without it, a
/// plain timeout). `progress` is called whenever the queue shrinks.
async fn until_stalled<T>(
    peer: &str,
    what: &'static str,
    after: Duration,
    conn: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    step: impl std::future::Future<Output = Result<T, WireError>>,
    progress: &mut impl FnMut(),
) -> Result<T, ScuError> {
    let queue = || conn.and_then(|(l, p)| crate::sendq::unacknowledged(l, p));
    tokio::pin!(step);
    let mut since = tokio::time::Instant::now();
    let mut queued: Option<u64> = None;
    // The first look comes after a quarter of `after`: a step that ends
    // sooner (any step on a fast link) never reads the queue.
    let poll = (after / 4).min(DRAIN_POLL);
    loop {
        let deadline = since + after;
        let tick = tokio::time::Instant::now() + poll;
        tokio::select! {
            done = &mut step => {
                return done.map_err(|source| ScuError::Wire {
                    peer: peer.to_string(),
                    source,
                });
            }
            _ = tokio::time::sleep_until(deadline.min(tick)) => {}
        }
        let now = tokio::time::Instant::now();
        let q = if conn.is_some() { queue() } else { None };
        if let (Some(before), Some(q)) = (queued, q) {
            if q < before {
                since = now;
                progress();
            }
        }
        queued = q.or(queued);
        if now >= since + after {
            return Err(ScuError::Timeout {
                peer: peer.to_string(),
                what,
                after,
            });
        }
    }
}

async fn within<T>(
    peer: &str,
    what: &'static str,
    after: Duration,
    step: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<T, ScuError> {
    timeout(after, step)
        .await
        .map_err(|_| ScuError::Timeout {
            peer: peer.to_string(),
            what,
            after,
        })?
        .map_err(|source| ScuError::Wire {
            peer: peer.to_string(),
            source,
        })
}

/// Resolves `address` (host:port), giving up after `within` (a resolver
/// that does not answer must not hang a forwarder).
pub async fn resolve(
    address: &str,
    within: Duration,
) -> Result<Vec<std::net::SocketAddr>, ScuError> {
    let failed = |source| ScuError::Resolve {
        address: address.to_string(),
        source,
    };
    let found = timeout(within, tokio::net::lookup_host(address))
        .await
        .map_err(|_| {
            failed(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the resolver within {within:?}"),
            ))
        })?
        .map_err(failed)?
        .collect::<Vec<_>>();
    if found.is_empty() {
        return Err(failed(std::io::Error::other("the name has no address")));
    }
    Ok(found)
}

/// What an A-ASSOCIATE-AC granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Only contexts accepted with a transfer syntax we proposed for them.
    pub contexts: Vec<AcceptedContext>,
    /// Largest PDU the peer accepts (16384 when it says nothing).
    pub peer_max_pdu: u32,
}

/// The peer's answer to our A-ASSOCIATE-RQ, judged: a pure function (the
/// fuzz target feeds it arbitrary answers).
pub fn negotiated(
    reply: Pdu,
    proposed: &[PresentationContextProposed],
    peer: &str,
) -> Result<Negotiated, ScuError> {
    let peer = peer.to_string();
    match reply {
        Pdu::AssociationAC(ac) => {
            let mut peer_max_pdu = 16384;
            for v in &ac.user_variables {
                if let UserVariableItem::MaxLength(len) = v {
                    peer_max_pdu = *len;
                }
            }
            let contexts = ac
                .presentation_contexts
                .iter()
                .filter(|r| r.reason == PresentationContextResultReason::Acceptance)
                .filter_map(|r| {
                    let p = proposed.iter().find(|p| p.id == r.id)?;
                    // Only what we proposed counts; a peer "accepting" another syntax is refusing ours.
                    p.transfer_syntaxes
                        .contains(&r.transfer_syntax)
                        .then(|| AcceptedContext {
                            id: r.id,
                            abstract_syntax: p.abstract_syntax.clone(),
                            transfer_syntax: r.transfer_syntax.clone(),
                        })
                })
                .collect();
            Ok(Negotiated {
                contexts,
                peer_max_pdu,
            })
        }
        Pdu::AssociationRJ(rj) => Err(ScuError::Rejected {
            peer,
            reason: rj.source.to_string(),
            permanent: rj.result == AssociationRJResult::Permanent,
        }),
        Pdu::AbortRQ { source } => Err(ScuError::Aborted {
            peer,
            reason: abort_reason(&source),
        }),
        other => Err(ScuError::Protocol {
            peer,
            detail: format!("expected A-ASSOCIATE-AC, got {}", other.short_description()),
        }),
    }
}

/// The error for a PDU other than P-DATA while a response is awaited.
fn not_p_data(pdu: Pdu, peer: &str, what: &'static str) -> ScuError {
    match pdu {
        Pdu::AbortRQ { source } => ScuError::Aborted {
            peer: peer.to_string(),
            reason: abort_reason(&source),
        },
        other => ScuError::Protocol {
            peer: peer.to_string(),
            detail: format!("unexpected {} while {what}", other.short_description()),
        },
    }
}

/// Gathers a response command set from the PDUs that carry it: a pure
/// state machine (the fuzz target feeds it arbitrary PDUs).
#[derive(Debug, Default)]
pub struct ResponseReader {
    bytes: Vec<u8>,
}

impl ResponseReader {
    /// The next PDU; `Some` once the command set is complete.
    pub fn push(
        &mut self,
        pdu: Pdu,
        peer: &str,
        what: &'static str,
    ) -> Result<Option<Command>, ScuError> {
        let protocol = |detail: String| ScuError::Protocol {
            peer: peer.to_string(),
            detail,
        };
        match pdu {
            Pdu::PData { data } => {
                for v in data {
                    if v.value_type != PDataValueType::Command {
                        return Err(protocol(
                            "dataset received where a response was expected".into(),
                        ));
                    }
                    self.bytes.extend_from_slice(&v.data);
                    if self.bytes.len() > crate::scp::MAX_COMMAND {
                        return Err(protocol("response command set too large".into()));
                    }
                    if v.is_last {
                        return Command::parse(&self.bytes)
                            .map(Some)
                            .map_err(|e| protocol(e.to_string()));
                    }
                }
                Ok(None)
            }
            other => Err(not_p_data(other, peer, what)),
        }
    }
}

/// What a C-GET brings ([`Scu::get_next`]).
#[derive(Debug)]
pub enum GetEvent {
    /// An instance, whole (at most [`MAX_GET_INSTANCE`] bytes).
    Store {
        pc: u8,
        message_id: u16,
        sop_class: String,
        sop_instance: String,
        transfer_syntax: String,
        dataset: Vec<u8>,
    },
    /// The final C-GET-RSP.
    Done {
        status: u16,
        ops: crate::query::SubOperations,
    },
}

/// Gathers whole messages (a command, and the dataset that follows when the
/// command announces one) from P-DATA: a pure state machine.
#[derive(Debug, Default)]
pub struct MessageReader {
    command: Vec<u8>,
    /// A complete command waiting for its dataset.
    waiting: Option<Command>,
    data: Vec<u8>,
}

/// A whole DIMSE message: its command and, when the command announces one,
/// its dataset.
/// A command, its dataset if one followed, and the presentation context
/// it came on.
pub type Message = (Command, Option<Vec<u8>>, u8);

/// Identifiers and failed-instance lists are small; more is not a PACS.
const MAX_RESPONSE_DATASET: usize = 4 << 20;
/// Largest instance taken by C-GET (held in memory while it is spooled);
/// a larger prior needs C-MOVE.
pub const MAX_GET_INSTANCE: usize = 256 << 20;

impl MessageReader {
    pub fn push(
        &mut self,
        pdu: Pdu,
        peer: &str,
        what: &'static str,
    ) -> Result<Vec<Message>, ScuError> {
        let protocol = |detail: String| ScuError::Protocol {
            peer: peer.to_string(),
            detail,
        };
        let mut done = Vec::new();
        match pdu {
            Pdu::PData { data } => {
                for v in data {
                    match (v.value_type, self.waiting.is_some()) {
                        (PDataValueType::Command, false) => {
                            self.command.extend_from_slice(&v.data);
                            if self.command.len() > crate::scp::MAX_COMMAND {
                                return Err(protocol("response command set too large".into()));
                            }
                            if v.is_last {
                                let c = Command::parse(&std::mem::take(&mut self.command))
                                    .map_err(|e| protocol(e.to_string()))?;
                                if c.has_dataset() {
                                    self.waiting = Some(c);
                                } else {
                                    done.push((c, None, v.presentation_context_id));
                                }
                            }
                        }
                        (PDataValueType::Data, true) => {
                            self.data.extend_from_slice(&v.data);
                            let limit = match self.waiting.as_ref().map(Command::command_field) {
                                Some(Ok(dimse::C_STORE_RQ)) => MAX_GET_INSTANCE,
                                _ => MAX_RESPONSE_DATASET,
                            };
                            if self.data.len() > limit {
                                return Err(protocol(format!(
                                    "a dataset larger than {} MiB",
                                    limit >> 20
                                )));
                            }
                            if v.is_last {
                                let c = self.waiting.take().expect("checked above");
                                done.push((
                                    c,
                                    Some(std::mem::take(&mut self.data)),
                                    v.presentation_context_id,
                                ));
                            }
                        }
                        (PDataValueType::Data, false) => {
                            return Err(protocol("dataset without a command".into()))
                        }
                        (PDataValueType::Command, true) => {
                            return Err(protocol("command where a dataset was announced".into()))
                        }
                    }
                }
                Ok(done)
            }
            other => Err(not_p_data(other, peer, what)),
        }
    }
}

fn abort_reason(source: &AbortRQSource) -> String {
    match source {
        AbortRQSource::ServiceUser => "by the service user".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpSocket;

    /// A connection whose receiver takes little into its buffer, so what
    /// is written waits in the sender's send queue.
    async fn narrow_pair() -> (TcpStream, TcpStream) {
        let socket = TcpSocket::new_v4().expect("test setup");
        socket.set_recv_buffer_size(16 * 1024).expect("test setup");
        socket
            .bind("127.0.0.1:0".parse().expect("test setup"))
            .expect("test setup");
        let listener = socket.listen(1).expect("test setup");
        let client = TcpStream::connect(listener.local_addr().expect("test setup"))
            .await
            .expect("test setup");
        let (server, _) = listener.accept().await.expect("test setup");
        (client, server)
    }

    fn conn(s: &TcpStream) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
        s.local_addr().ok().zip(s.peer_addr().ok())
    }

    /// Writes 2 MiB (most of it stays queued here), then waits for one
    /// byte of answer with `after` without progress allowed.
    async fn send_then_wait(
        client: &mut TcpStream,
        after: Duration,
    ) -> (Result<u8, ScuError>, usize) {
        client
            .write_all(&vec![7u8; 2 << 20])
            .await
            .expect("test setup");
        let c = conn(client);
        let mut beats = 0;
        let answer = until_stalled(
            "peer",
            "waiting for C-STORE-RSP",
            after,
            c,
            async { client.read_u8().await.map_err(WireError::Io) },
            &mut || beats += 1,
        )
        .await;
        (answer, beats)
    }

    #[tokio::test]
    async fn a_wait_lasts_while_the_peer_takes_the_send_queue() {
        let (mut client, mut server) = narrow_pair().await;
        // The peer takes 64 KiB every 100 ms: the 2 MiB take ~3 s, six
        // times the 500 ms allowed without progress; then it answers.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < 2 << 20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got += server.read(&mut buf).await.expect("test setup");
            }
            server.write_all(&[1]).await.expect("test setup");
            server
        });
        let started = std::time::Instant::now();
        let (answer, beats) = send_then_wait(&mut client, Duration::from_millis(500)).await;
        assert!(
            matches!(answer, Ok(1)),
            "{answer:?} after {:?}",
            started.elapsed()
        );
        assert!(beats > 0, "the drain was progress");
        drop(reader.await.expect("test setup"));
    }

    #[tokio::test]
    async fn a_peer_that_stops_taking_bytes_still_times_out() {
        let (mut client, server) = narrow_pair().await;
        let started = std::time::Instant::now();
        let (answer, _) = send_then_wait(&mut client, Duration::from_millis(500)).await;
        assert!(
            matches!(answer, Err(ScuError::Timeout { .. })),
            "{answer:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(server);
    }
}
