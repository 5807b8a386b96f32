//! Urgent findings (`[urgent]`): a result the reading center sends with
//! C-STORE priority HIGH is an urgent finding. The spool records it (table
//! `urgent`) in the same commit that acknowledges the C-STORE; this task
//! tells people about it and keeps telling them until someone acknowledges.
//!
//! Every second it takes the entries whose next notice is due:
//! - `new`: an e-mail through the hospital's SMTP relay to `urgent.email.to`
//!   → `notified`, next notice after `urgent.ack_within`;
//! - `notified` or `escalated`, not acknowledged in time: again, to `to`
//!   and `escalate_to` → `escalated`, and again after each further period.
//!
//! With `[urgent.hl7]` each notice is also an HL7 ORU^R01 over MLLP to the
//! RIS; its ACK AA acknowledges the finding (the RIS took it over).
//!
//! With `[results.hl7]` every routine result (entry marked `routine`) is
//! also told to the RIS: one ORU^R01 with abnormal flag N, repeated with
//! backoff until its ACK AA; no e-mail, no escalation (audit `report`).
//!
//! A channel that fails is retried with backoff (10 s doubling to 5 min)
//! when no channel got through; each notice and each failure is an audit
//! record (`urgent`), so nothing is silent. `kakehashi urgent ack ID`
//! acknowledges (the control socket).
//!
//! The e-mail carries the six facts of a critical-result communication:
//! the finding, when it was found (the report's content time), the
//! reporting physician, the recipients, when it was delivered (the relay's
//! acceptance, recorded as the notice's time) and the method.

use std::sync::Arc;
use std::time::Duration;

use kakehashi_config::EmailConfig;
use kakehashi_spool::{Notice, UrgentDetails, UrgentEntry, UrgentState};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{now_ms, Shared};

pub async fn run(shared: Arc<Shared>, token: CancellationToken) {
    let urgent = shared.config.urgent.clone();
    let routine = shared.config.results.as_ref().and_then(|r| r.hl7.clone());
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let spool = Arc::clone(&shared.spool);
        let due = match tokio::task::spawn_blocking(move || spool.urgent_due(now_ms())).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::error!("cannot read the urgent findings: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("urgent task failed: {e}");
                continue;
            }
        };
        for entry in due {
            if token.is_cancelled() {
                return;
            }
            match (&entry.routine, &urgent, &routine) {
                (false, Some(cfg), _) => notify(&shared, cfg, entry).await,
                (true, _, Some(hl7)) => report(&shared, hl7, entry).await,
                // Written while the config had a section it has no more.
                _ => {}
            }
        }
    }
}

/// What one channel did with one notice.
enum Outcome {
    /// Delivered to these recipients; the words for the audit trail.
    Sent {
        method: &'static str,
        recipients: Vec<String>,
        said: String,
        /// The receiver took responsibility for the finding (the RIS's
        /// HL7 ACK with AA): no more notices.
        acknowledges: Option<String>,
    },
    Failed(String),
}

async fn notify(shared: &Shared, cfg: &kakehashi_config::UrgentConfig, entry: UrgentEntry) {
    let details = shared.spool.urgent_details(&entry);
    let reminder = entry.state != UrgentState::New;
    let notice = entry.notices.len() + 1;
    let mut outcomes = Vec::new();
    if let Some(email) = &cfg.email {
        let mut recipients = email.to.clone();
        if reminder {
            recipients.extend(email.escalate_to.iter().cloned());
        }
        let message = compose(
            email,
            &entry,
            details.as_ref(),
            &recipients,
            notice,
            cfg.ack_within,
        );
        outcomes.push(match send(email, &recipients, &message).await {
            Ok(reply) => Outcome::Sent {
                method: "e-mail",
                said: format!(
                    "by e-mail to {}: accepted by the relay ({reply})",
                    recipients.join(", ")
                ),
                recipients,
                acknowledges: None,
            },
            Err(e) => Outcome::Failed(format!("e-mail: {e}")),
        });
    }
    if let Some(hl7) = &cfg.hl7 {
        let control = format!("KKH{}N{}A{}", entry.id, notice, entry.attempts);
        let message = oru_r01(hl7, &entry, details.as_ref(), &control, "AA");
        outcomes.push(match send_hl7(hl7, &message, &control).await {
            Ok(ack) => Outcome::Sent {
                method: "HL7 ORU^R01",
                recipients: vec![format!("{} at {}", hl7.receiving_application, hl7.ris)],
                said: format!(
                    "by HL7 ORU^R01 {control} to {} at {}: ACK {ack}",
                    hl7.receiving_application, hl7.ris
                ),
                acknowledges: Some(format!(
                    "{} (HL7 ACK AA to {control})",
                    hl7.receiving_application
                )),
            },
            Err(e) => Outcome::Failed(format!("HL7 to {}: {e}", hl7.ris)),
        });
    }
    let now = now_ms();
    let ack_within = cfg.ack_within.as_millis() as u64;
    let escalates = cfg
        .email
        .as_ref()
        .is_some_and(|e| !e.escalate_to.is_empty());
    let spool = Arc::clone(&shared.spool);
    let id = entry.id;
    let outcome = tokio::task::spawn_blocking(move || {
        spool.update_urgent(id, "kakehashid", now, |e| {
            if e.state == UrgentState::Acknowledged {
                // Acknowledged while the notice went out: nothing to change.
                return Err("acknowledged meanwhile".into());
            }
            let mut said = Vec::new();
            let mut failed = Vec::new();
            let mut acknowledged = None;
            for o in outcomes {
                match o {
                    Outcome::Sent {
                        method,
                        recipients,
                        said: words,
                        acknowledges,
                    } => {
                        e.notices.push(Notice {
                            time_ms: now,
                            method: method.into(),
                            recipients,
                        });
                        said.push(words);
                        acknowledged = acknowledged.or(acknowledges);
                    }
                    Outcome::Failed(why) => failed.push(why),
                }
            }
            e.last_error = (!failed.is_empty()).then(|| failed.join("; "));
            if said.is_empty() {
                e.attempts += 1;
                let wait = backoff(e.attempts);
                e.next_ms = now + wait.as_millis() as u64;
                return Ok(format!(
                    "notice {notice} of urgent finding {id} failed (attempt {}): {}; again in {} s",
                    e.attempts,
                    failed.join("; "),
                    wait.as_secs()
                ));
            }
            e.attempts = 0;
            e.next_ms = now + ack_within;
            e.state = match (acknowledged.is_some(), e.state) {
                (true, _) => UrgentState::Acknowledged,
                (false, UrgentState::New) => UrgentState::Notified,
                (false, _) if escalates => UrgentState::Escalated,
                (false, s) => s,
            };
            let mut words = format!("notice {notice} of urgent finding {id} {}", said.join("; "));
            if !failed.is_empty() {
                words.push_str(&format!("; FAILED: {}", failed.join("; ")));
            }
            match acknowledged {
                Some(by) => {
                    e.acknowledged_ms = Some(now);
                    e.acknowledged_by = Some(by.clone());
                    words.push_str(&format!("; acknowledged by {by}"));
                }
                None if notice == 1 => words.push_str("; waiting for an acknowledgement"),
                None => words.push_str(&format!(
                    "; not acknowledged after {} notice(s): escalated",
                    notice - 1
                )),
            }
            Ok(words)
        })
    })
    .await;
    match outcome {
        Ok(Ok(e)) => match &e.last_error {
            None => tracing::warn!(id, state = e.state.as_str(), "urgent finding notified"),
            Some(why) => tracing::error!(
                id,
                state = e.state.as_str(),
                "urgent finding: a notice FAILED: {why}"
            ),
        },
        Ok(Err(kakehashi_spool::SpoolError::Refused(_))) => {}
        Ok(Err(e)) => tracing::error!(id, "cannot record the urgent notice: {e}"),
        Err(e) => tracing::error!(id, "urgent record task failed: {e}"),
    }
}

/// A routine report to the RIS (`[results.hl7]`): one ORU^R01 with
/// abnormal flag N; its ACK AA closes the entry, anything else is retried
/// with backoff (10 s doubling to 5 min), each step audited (`report`).
async fn report(shared: &Shared, hl7: &kakehashi_config::Hl7Config, entry: UrgentEntry) {
    let details = shared.spool.urgent_details(&entry);
    let control = format!("KKR{}A{}", entry.id, entry.attempts);
    let message = oru_r01(hl7, &entry, details.as_ref(), &control, "N");
    let sent = send_hl7(hl7, &message, &control).await;
    let now = now_ms();
    let spool = Arc::clone(&shared.spool);
    let id = entry.id;
    let ris = format!("{} at {}", hl7.receiving_application, hl7.ris);
    let outcome = tokio::task::spawn_blocking(move || {
        spool.update_urgent(id, "kakehashid", now, |e| match sent {
            Ok(ack) => {
                e.notices.push(Notice {
                    time_ms: now,
                    method: "HL7 ORU^R01".into(),
                    recipients: vec![ris.clone()],
                });
                e.state = UrgentState::Acknowledged;
                e.acknowledged_ms = Some(now);
                e.acknowledged_by = Some(format!("{ris} (HL7 ACK AA to {control})"));
                e.last_error = None;
                Ok(format!(
                    "report notice {id}: HL7 ORU^R01 {control} to {ris}: ACK {ack}"
                ))
            }
            Err(why) => {
                e.attempts += 1;
                let wait = backoff(e.attempts);
                e.next_ms = now + wait.as_millis() as u64;
                e.last_error = Some(why.clone());
                Ok(format!(
                    "report notice {id}: HL7 to {ris} failed (attempt {}): {why}; again in {} s",
                    e.attempts,
                    wait.as_secs()
                ))
            }
        })
    })
    .await;
    match outcome {
        Ok(Ok(e)) => match &e.last_error {
            None => tracing::info!(id, "report told to the RIS"),
            Some(why) => tracing::warn!(id, "report to the RIS failed: {why}"),
        },
        Ok(Err(e)) => tracing::error!(id, "cannot record the report notice: {e}"),
        Err(e) => tracing::error!(id, "report record task failed: {e}"),
    }
}

/// After `attempts` failures in a row: 10 s doubling to 5 min.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(5)
        .saturating_mul(1 << attempts.min(6))
        .min(Duration::from_secs(300))
}

/// HL7 v2.5.1 text: the delimiters escaped, one line.
fn hl7_text(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\E\\"),
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\r' | '\n' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// An ORU^R01 carrying the report: PID (the patient), OBR (the study),
/// OBX (the finding, with abnormal flag `flag`: AA, critically abnormal,
/// for an urgent finding, N for a routine report; the reporting physician
/// as responsible observer).
fn oru_r01(
    hl7: &kakehashi_config::Hl7Config,
    e: &UrgentEntry,
    details: Option<&UrgentDetails>,
    control: &str,
    flag: &str,
) -> String {
    let facts = details.map(|d| &d.facts);
    let t = hl7_text;
    let title = t(facts
        .and_then(|f| f.title.as_deref())
        .unwrap_or(if flag == "AA" {
            "Urgent finding"
        } else {
            "Report"
        }));
    let text = t(facts
        .and_then(|f| f.text.as_deref())
        .unwrap_or("(see the report)"));
    // A DICOM person name (Family^Given^…) as an XCN: ^Family^Given^….
    let physician = facts
        .and_then(|f| f.physician.as_deref())
        .map(|p| {
            let parts: Vec<String> = p.split('^').take(4).map(t).collect();
            format!("^{}", parts.join("^"))
        })
        .unwrap_or_default();
    let made: String = facts
        .and_then(|f| f.made.as_deref())
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let patient = t(details.map_or("", |d| d.patient_id.as_str()));
    [
        format!(
            "MSH|^~\\&|{}|{}|{}|{}|{}||ORU^R01^ORU_R01|{control}|P|2.5.1||||||UNICODE UTF-8",
            hl7.sending_application,
            hl7.sending_facility,
            hl7.receiving_application,
            hl7.receiving_facility,
            hl7_timestamp(now_ms())
        ),
        format!("PID|1||{patient}"),
        format!(
            "OBR|1||{}^KAKEHASHI|^{title}|||{made}",
            t(&e.study_instance_uid)
        ),
        format!("OBX|1|TX|^{title}||{text}|||{flag}|||F|||||{physician}"),
    ]
    .join("\r")
}

/// `YYYYMMDDHHMMSS` (UTC).
fn hl7_timestamp(ms: u64) -> String {
    let d = rfc5322_date(ms); // "Mon, 23 Nov 2026 10:15:00 +0000"
    let parts: Vec<&str> = d.split(' ').collect();
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])
    .unwrap_or(0)
        + 1;
    format!(
        "{}{month:02}{}{}",
        parts[3],
        parts[1],
        parts[4].replace(':', "")
    )
}

/// One ORU over MLLP and its ACK; the ACK's code when it is AA.
async fn send_hl7(
    hl7: &kakehashi_config::Hl7Config,
    message: &str,
    control: &str,
) -> Result<String, String> {
    tokio::time::timeout(hl7.timeout, async {
        let mut stream = TcpStream::connect(&hl7.ris)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut frame = Vec::with_capacity(message.len() + 3);
        frame.push(0x0B);
        frame.extend_from_slice(message.as_bytes());
        frame.extend_from_slice(&[0x1C, 0x0D]);
        stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut stream, &mut buf)
                .await
                .map_err(|e| format!("waiting for the ACK: {e}"))?;
            if n == 0 {
                return Err("closed the connection without an ACK".to_string());
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(2).any(|w| w == [0x1C, 0x0D]) {
                break;
            }
            if answer.len() > 65_536 {
                return Err("answered more than an ACK".to_string());
            }
        }
        ack_code(&answer, control)
    })
    .await
    .unwrap_or_else(|_| Err(format!("no ACK within {} s", hl7.timeout.as_secs())))
}

/// MSA-1 of an MLLP-framed ACK that answers `control`: `Ok` for AA/CA,
/// an error naming the code (and MSA-3's text) otherwise.
fn ack_code(framed: &[u8], control: &str) -> Result<String, String> {
    let text = String::from_utf8_lossy(framed);
    let msa = text
        .trim_matches(|c| c == '\u{0b}' || c == '\u{1c}' || c == '\r' || c == '\n')
        .split(['\r', '\n'])
        .find(|seg| seg.starts_with("MSA|"))
        .ok_or("an answer without an MSA segment")?;
    let fields: Vec<&str> = msa.split('|').collect();
    let code = fields.get(1).copied().unwrap_or("");
    let answers = fields.get(2).copied().unwrap_or("");
    if answers != control {
        return Err(format!("an ACK for message {answers:?}, not {control:?}"));
    }
    match code {
        "AA" | "CA" => Ok(code.to_string()),
        other => Err(format!(
            "the RIS answered {other}{}",
            fields
                .get(3)
                .filter(|t| !t.is_empty())
                .map(|t| format!(": {t}"))
                .unwrap_or_default()
        )),
    }
}

/// The message: headers and a plain-text body (CRLF line ends, not yet
/// dot-stuffed).
fn compose(
    email: &EmailConfig,
    e: &UrgentEntry,
    details: Option<&UrgentDetails>,
    recipients: &[String],
    notice: usize,
    ack_within: Duration,
) -> String {
    let none = "(not in the report)";
    let (patient, title, text, made, physician) = match details {
        Some(d) => (
            d.patient_id.as_str(),
            d.facts.title.as_deref().unwrap_or(none),
            d.facts.text.as_deref().unwrap_or(none),
            d.facts.made.as_deref().unwrap_or(none),
            d.facts.physician.as_deref().unwrap_or(none),
        ),
        None => ("(sealed; the box cannot open it)", none, none, none, none),
    };
    let subject = if notice == 1 {
        format!("URGENT finding for patient {patient}: {title}")
    } else {
        format!(
            "REMINDER {notice}, not acknowledged: URGENT finding for patient {patient}: {title}"
        )
    };
    let host = hostname();
    let body = format!(
        "The reading center reported an URGENT finding.\n\
         \n\
         Finding:              {title}\n\
         {text}\n\
         Urgent because:       {reason}\n\
         \n\
         Patient ID:           {patient}\n\
         Study Instance UID:   {study}\n\
         Reported (report):    {made}\n\
         Reporting physician:  {physician}\n\
         From:                 {from}\n\
         Received by the box:  {received}\n\
         Notice:               {notice}{reminder} (method: e-mail)\n\
         \n\
         Acknowledge on the box {host}: kakehashi urgent ack {id}\n\
         Until then this notice is repeated every {every} s, to the escalation list too.\n",
        study = e.study_instance_uid,
        reason = e.reason,
        from = e.from,
        received = rfc5322_date(e.received_ms),
        reminder = if notice > 1 {
            ", not acknowledged yet"
        } else {
            ""
        },
        id = e.id,
        every = ack_within.as_secs(),
    );
    let headers = format!(
        "From: {from}\nTo: {to}\nSubject: {subject}\nDate: {date}\nMessage-ID: <kakehashi-urgent-{id}-{notice}-{ms}@{host}>\nImportance: high\nX-Priority: 1\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n",
        from = email.from,
        to = recipients.join(", "),
        subject = header_text(&subject),
        date = rfc5322_date(now_ms()),
        id = e.id,
        ms = now_ms(),
    );
    format!("{headers}\n{body}").replace('\n', "\r\n")
}

/// A header value: one line, ASCII (anything else becomes `?`, so a
/// patient's name can never break the header block).
fn header_text(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .unwrap_or_else(|| "kakehashi".into())
}

/// `Mon, 23 Nov 2026 10:15:00 +0000`.
fn rfc5322_date(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One SMTP transaction (RFC 5321) through the relay; the relay's reply to
/// the message on success.
async fn send(email: &EmailConfig, recipients: &[String], message: &str) -> Result<String, String> {
    tokio::time::timeout(email.timeout, transaction(email, recipients, message))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the SMTP relay {} did not finish within {} s",
                email.relay,
                email.timeout.as_secs()
            ))
        })
}

async fn transaction(
    email: &EmailConfig,
    recipients: &[String],
    message: &str,
) -> Result<String, String> {
    let relay = &email.relay;
    let stream = TcpStream::connect(relay)
        .await
        .map_err(|e| format!("cannot connect to the SMTP relay {relay}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    expect(&mut read, 220, "greeting", relay).await?;
    command(&mut write, &format!("EHLO {}", hostname()), relay).await?;
    expect(&mut read, 250, "EHLO", relay).await?;
    command(&mut write, &format!("MAIL FROM:<{}>", email.from), relay).await?;
    expect(&mut read, 250, "MAIL FROM", relay).await?;
    let mut accepted = 0;
    let mut refused = Vec::new();
    for r in recipients {
        command(&mut write, &format!("RCPT TO:<{r}>"), relay).await?;
        match expect(&mut read, 250, "RCPT TO", relay).await {
            Ok(_) => accepted += 1,
            Err(e) => refused.push(format!("{r}: {e}")),
        }
    }
    if accepted == 0 {
        return Err(format!(
            "the relay refused every recipient: {}",
            refused.join("; ")
        ));
    }
    command(&mut write, "DATA", relay).await?;
    expect(&mut read, 354, "DATA", relay).await?;
    // Dot-stuffing (RFC 5321 4.5.2), then the end-of-data line.
    let mut data = String::with_capacity(message.len() + 64);
    for line in message.split("\r\n") {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
        data.push_str("\r\n");
    }
    data.push_str(".\r\n");
    write
        .write_all(data.as_bytes())
        .await
        .map_err(|e| format!("SMTP relay {relay}: {e}"))?;
    let reply = expect(&mut read, 250, "the message", relay).await?;
    let _ = command(&mut write, "QUIT", relay).await;
    if refused.is_empty() {
        Ok(reply)
    } else {
        Ok(format!("{reply}; refused: {}", refused.join("; ")))
    }
}

async fn command(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    line: &str,
    relay: &str,
) -> Result<(), String> {
    write
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .map_err(|e| format!("SMTP relay {relay}: {e}"))
}

/// Reads one (possibly multi-line) reply; its last line if the code is
/// `want`, else an error quoting the relay.
async fn expect(
    read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    want: u16,
    after: &str,
    relay: &str,
) -> Result<String, String> {
    let mut lines = 0;
    loop {
        let mut line = String::new();
        let n = read
            .read_line(&mut line)
            .await
            .map_err(|e| format!("SMTP relay {relay}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the SMTP relay {relay} closed the connection after {after}"
            ));
        }
        lines += 1;
        if lines > 100 || line.len() > 2000 {
            return Err(format!(
                "the SMTP relay {relay} answered too much after {after}"
            ));
        }
        let line = line.trim_end();
        let code: Option<u16> = line.get(..3).and_then(|c| c.parse().ok());
        let more = line.as_bytes().get(3) == Some(&b'-');
        if more {
            continue;
        }
        return match code {
            Some(c) if c == want => Ok(line.to_string()),
            _ => Err(format!(
                "the SMTP relay {relay} answered {after} with {line:?}"
            )),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_421_747_000),
            "Mon, 23 Nov 2026 08:15:47 +0000"
        );
    }

    #[test]
    fn headers_stay_one_ascii_line() {
        assert_eq!(header_text("山田\r\nBcc: x@y"), "????Bcc: x@y");
    }

    #[test]
    fn hl7_acks_and_escapes() {
        assert_eq!(
            ack_code(
                b"\x0bMSH|^~\\&|RIS|H|K|B|1||ACK|9|P|2.5.1\rMSA|AA|KKH1N1A0\r\x1c\r",
                "KKH1N1A0"
            ),
            Ok("AA".to_string())
        );
        let refused = ack_code(b"\x0bMSA|AE|KKH1N1A0|unknown patient\r\x1c\r", "KKH1N1A0");
        assert_eq!(
            refused,
            Err("the RIS answered AE: unknown patient".to_string())
        );
        assert!(ack_code(b"\x0bMSA|AA|OTHER\r\x1c\r", "KKH1N1A0").is_err());
        assert!(ack_code(b"garbage", "KKH1N1A0").is_err());
        assert_eq!(
            hl7_text("a|b^c&d~e\\f\r\ng"),
            "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f  g"
        );
        assert_eq!(hl7_timestamp(1_795_421_747_000), "20261123081547");
    }
}
