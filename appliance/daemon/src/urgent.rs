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
//! A relay that fails is retried with backoff (10 s doubling to 5 min); each
//! notice and each failure is an audit record (`urgent`), so nothing is
//! silent. `kakehashi urgent ack ID` acknowledges (the control socket).
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
    let Some(cfg) = shared.config.urgent.clone() else {
        return;
    };
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
            notify(&shared, &cfg, entry).await;
        }
    }
}

async fn notify(shared: &Shared, cfg: &kakehashi_config::UrgentConfig, entry: UrgentEntry) {
    let details = shared.spool.urgent_details(&entry);
    let reminder = entry.state != UrgentState::New;
    let mut recipients = cfg.email.to.clone();
    if reminder {
        recipients.extend(cfg.email.escalate_to.iter().cloned());
    }
    let message = compose(
        &cfg.email,
        &entry,
        details.as_ref(),
        &recipients,
        entry.notices.len() + 1,
        cfg.ack_within,
    );
    let sent = send(&cfg.email, &recipients, &message).await;
    let now = now_ms();
    let ack_within = cfg.ack_within.as_millis() as u64;
    let escalates = !cfg.email.escalate_to.is_empty();
    let spool = Arc::clone(&shared.spool);
    let id = entry.id;
    let outcome = tokio::task::spawn_blocking(move || {
        spool.update_urgent(id, "kakehashid", now, |e| {
            if e.state == UrgentState::Acknowledged {
                // Acknowledged while the mail went out: nothing to change.
                return Err("acknowledged meanwhile".into());
            }
            match sent {
                Ok(reply) => {
                    let n = e.notices.len() + 1;
                    e.notices.push(Notice {
                        time_ms: now,
                        method: "e-mail".into(),
                        recipients: recipients.clone(),
                    });
                    e.state = match e.state {
                        UrgentState::New => UrgentState::Notified,
                        _ if escalates => UrgentState::Escalated,
                        s => s,
                    };
                    e.attempts = 0;
                    e.last_error = None;
                    e.next_ms = now + ack_within;
                    Ok(format!(
                        "notice {n} of urgent finding {id} by e-mail to {}: accepted by the relay ({reply}); {}",
                        recipients.join(", "),
                        if n == 1 {
                            "waiting for an acknowledgement".to_string()
                        } else {
                            format!("not acknowledged after {} notice(s): escalated", n - 1)
                        }
                    ))
                }
                Err(why) => {
                    e.attempts += 1;
                    let wait = Duration::from_secs(5)
                        .saturating_mul(1 << e.attempts.min(6))
                        .min(Duration::from_secs(300));
                    e.next_ms = now + wait.as_millis() as u64;
                    e.last_error = Some(why.clone());
                    Ok(format!(
                        "notice of urgent finding {id} by e-mail failed (attempt {}): {why}; again in {} s",
                        e.attempts,
                        wait.as_secs()
                    ))
                }
            }
        })
    })
    .await;
    match outcome {
        Ok(Ok(e)) => match &e.last_error {
            None => tracing::warn!(
                id,
                state = e.state.as_str(),
                "urgent finding notified by e-mail"
            ),
            Some(why) => tracing::error!(id, "urgent finding NOT notified: {why}"),
        },
        Ok(Err(kakehashi_spool::SpoolError::Refused(_))) => {}
        Ok(Err(e)) => tracing::error!(id, "cannot record the urgent notice: {e}"),
        Err(e) => tracing::error!(id, "urgent record task failed: {e}"),
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
}
