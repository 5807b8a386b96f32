//! DIMSE command sets: group 0000 elements, always implicit VR little endian.

use crate::uids::trim_uid;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
pub const C_FIND_RQ: u16 = 0x0020;
pub const C_FIND_RSP: u16 = 0x8020;
pub const C_MOVE_RQ: u16 = 0x0021;
pub const C_MOVE_RSP: u16 = 0x8021;
pub const C_CANCEL_RQ: u16 = 0x0FFF;
pub const C_GET_RQ: u16 = 0x0010;
pub const C_GET_RSP: u16 = 0x8010;

pub const NO_DATASET: u16 = 0x0101;

const AFFECTED_SOP_CLASS: u32 = 0x0000_0002;
const COMMAND_FIELD: u32 = 0x0000_0100;
const MESSAGE_ID: u32 = 0x0000_0110;
const RESPONDED_TO: u32 = 0x0000_0120;
const PRIORITY: u32 = 0x0000_0700;
const DATASET_TYPE: u32 = 0x0000_0800;
const STATUS: u32 = 0x0000_0900;
const ERROR_COMMENT: u32 = 0x0000_0902;
const AFFECTED_SOP_INSTANCE: u32 = 0x0000_1000;
const MOVE_DESTINATION: u32 = 0x0000_0600;
const REMAINING: u32 = 0x0000_1020;
const COMPLETED: u32 = 0x0000_1021;
const FAILED: u32 = 0x0000_1022;
const WARNING: u32 = 0x0000_1023;
const MOVE_ORIGINATOR_AE: u32 = 0x0000_1030;
const MOVE_ORIGINATOR_ID: u32 = 0x0000_1031;

/// C-STORE statuses the relay sends.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Out of resources (spool full, disk low).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Data set does not match SOP class / cannot be understood.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Processing failure (an internal fault, not the sender's).
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("command set truncated at byte {0}")]
    Truncated(usize),
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

/// A parsed command set: its elements in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    elements: Vec<(u32, Vec<u8>)>,
}

impl Command {
    pub fn parse(bytes: &[u8]) -> Result<Command, CommandError> {
        let mut elements = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let head = bytes
                .get(pos..pos + 8)
                .ok_or(CommandError::Truncated(pos))?;
            let group = u16::from_le_bytes([head[0], head[1]]);
            let elem = u16::from_le_bytes([head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let value = bytes
                .get(pos + 8..pos + 8 + len)
                .ok_or(CommandError::Truncated(pos))?;
            elements.push(((u32::from(group) << 16) | u32::from(elem), value.to_vec()));
            pos += 8 + len;
        }
        Ok(Command { elements })
    }

    fn get(&self, tag: u32) -> Option<&[u8]> {
        self.elements
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_slice())
    }

    fn us(&self, tag: u32) -> Option<u16> {
        self.get(tag)
            .filter(|v| v.len() >= 2)
            .map(|v| u16::from_le_bytes([v[0], v[1]]))
    }

    fn text(&self, tag: u32) -> Option<String> {
        self.get(tag)
            .map(|v| trim_uid(&String::from_utf8_lossy(v)).trim().to_string())
    }

    pub fn command_field(&self) -> Result<u16, CommandError> {
        self.us(COMMAND_FIELD)
            .ok_or(CommandError::Missing("Command Field (0000,0100)"))
    }
    pub fn message_id(&self) -> Option<u16> {
        self.us(MESSAGE_ID)
    }
    pub fn responded_to(&self) -> Option<u16> {
        self.us(RESPONDED_TO)
    }
    pub fn has_dataset(&self) -> bool {
        self.us(DATASET_TYPE).is_some_and(|v| v != NO_DATASET)
    }
    pub fn priority(&self) -> u16 {
        self.us(PRIORITY).unwrap_or(0)
    }
    pub fn status(&self) -> Option<u16> {
        self.us(STATUS)
    }
    pub fn error_comment(&self) -> Option<String> {
        self.text(ERROR_COMMENT)
    }
    pub fn affected_sop_class(&self) -> Option<String> {
        self.text(AFFECTED_SOP_CLASS)
    }
    pub fn affected_sop_instance(&self) -> Option<String> {
        self.text(AFFECTED_SOP_INSTANCE)
    }
    /// Move Destination (0000,0600) of a C-MOVE-RQ.
    pub fn move_destination(&self) -> Option<String> {
        self.text(MOVE_DESTINATION).filter(|t| !t.is_empty())
    }
    pub fn move_originator(&self) -> Option<String> {
        self.text(MOVE_ORIGINATOR_AE).filter(|t| !t.is_empty())
    }
    pub fn move_originator_id(&self) -> Option<u16> {
        self.us(MOVE_ORIGINATOR_ID)
    }
    /// Sub-operation counts of a C-MOVE/C-GET response (absent: 0).
    pub fn sub_operations(&self) -> crate::query::SubOperations {
        crate::query::SubOperations {
            remaining: self.us(REMAINING).unwrap_or(0),
            completed: self.us(COMPLETED).unwrap_or(0),
            failed: self.us(FAILED).unwrap_or(0),
            warning: self.us(WARNING).unwrap_or(0),
        }
    }
}

/// Builds a command set in implicit VR LE, group length first.
#[derive(Debug, Default)]
struct Builder {
    body: Vec<u8>,
}

impl Builder {
    fn raw(mut self, tag: u32, value: &[u8]) -> Self {
        self.body
            .extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        self.body.extend_from_slice(&(tag as u16).to_le_bytes());
        self.body
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.body.extend_from_slice(value);
        self
    }
    fn us(self, tag: u32, v: u16) -> Self {
        self.raw(tag, &v.to_le_bytes())
    }
    fn uid(self, tag: u32, uid: &str) -> Self {
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.raw(tag, &v)
    }
    fn text(self, tag: u32, s: &str) -> Self {
        let mut v: Vec<u8> = s
            .bytes()
            .filter(|b| (0x20..0x7f).contains(b) && *b != b'\\')
            .take(64)
            .collect();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.raw(tag, &v)
    }
    /// Error Comment (0000,0902), when there is one.
    fn comment(self, comment: Option<&str>) -> Self {
        match comment {
            Some(c) => self.text(ERROR_COMMENT, c),
            None => self,
        }
    }
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 12);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

pub fn c_echo_rsp(responded_to: u16) -> Vec<u8> {
    Builder::default()
        .uid(AFFECTED_SOP_CLASS, crate::uids::VERIFICATION)
        .us(COMMAND_FIELD, C_ECHO_RSP)
        .us(RESPONDED_TO, responded_to)
        .us(DATASET_TYPE, NO_DATASET)
        .us(STATUS, status::SUCCESS)
        .finish()
}

pub fn c_echo_rq(message_id: u16) -> Vec<u8> {
    Builder::default()
        .uid(AFFECTED_SOP_CLASS, crate::uids::VERIFICATION)
        .us(COMMAND_FIELD, C_ECHO_RQ)
        .us(MESSAGE_ID, message_id)
        .us(DATASET_TYPE, NO_DATASET)
        .finish()
}

pub fn c_store_rsp(
    responded_to: u16,
    sop_class: &str,
    sop_instance: &str,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    let b = Builder::default()
        .uid(AFFECTED_SOP_CLASS, sop_class)
        .us(COMMAND_FIELD, C_STORE_RSP)
        .us(RESPONDED_TO, responded_to)
        .us(DATASET_TYPE, NO_DATASET)
        .us(STATUS, status)
        .comment(comment);
    b.uid(AFFECTED_SOP_INSTANCE, sop_instance).finish()
}

pub fn c_store_rq(message_id: u16, sop_class: &str, sop_instance: &str, priority: u16) -> Vec<u8> {
    Builder::default()
        .uid(AFFECTED_SOP_CLASS, sop_class)
        .us(COMMAND_FIELD, C_STORE_RQ)
        .us(MESSAGE_ID, message_id)
        .us(PRIORITY, priority)
        .us(DATASET_TYPE, 0x0000)
        .uid(AFFECTED_SOP_INSTANCE, sop_instance)
        .finish()
}

pub fn c_find_rq(message_id: u16, sop_class: &str, priority: u16) -> Vec<u8> {
    query_rq(C_FIND_RQ, message_id, sop_class, priority)
}

pub fn c_get_rq(message_id: u16, sop_class: &str, priority: u16) -> Vec<u8> {
    query_rq(C_GET_RQ, message_id, sop_class, priority)
}

/// A C-FIND-RQ or C-GET-RQ (an identifier follows).
fn query_rq(field: u16, message_id: u16, sop_class: &str, priority: u16) -> Vec<u8> {
    Builder::default()
        .uid(AFFECTED_SOP_CLASS, sop_class)
        .us(COMMAND_FIELD, field)
        .us(MESSAGE_ID, message_id)
        .us(PRIORITY, priority)
        .us(DATASET_TYPE, 0x0000)
        .finish()
}

pub fn c_move_rq(message_id: u16, sop_class: &str, priority: u16, destination: &str) -> Vec<u8> {
    Builder::default()
        .uid(AFFECTED_SOP_CLASS, sop_class)
        .us(COMMAND_FIELD, C_MOVE_RQ)
        .us(MESSAGE_ID, message_id)
        .text(MOVE_DESTINATION, destination)
        .us(PRIORITY, priority)
        .us(DATASET_TYPE, 0x0000)
        .finish()
}

/// A C-FIND-RSP: pending ones carry an identifier (`with_dataset`).
pub fn c_find_rsp(
    responded_to: u16,
    sop_class: &str,
    status: u16,
    with_dataset: bool,
    comment: Option<&str>,
) -> Vec<u8> {
    let b = Builder::default()
        .uid(AFFECTED_SOP_CLASS, sop_class)
        .us(COMMAND_FIELD, C_FIND_RSP)
        .us(RESPONDED_TO, responded_to)
        .us(DATASET_TYPE, if with_dataset { 0x0000 } else { NO_DATASET })
        .us(STATUS, status)
        .comment(comment);
    b.finish()
}

/// A C-MOVE-RSP with its sub-operation counts (remaining only while
/// pending).
pub fn c_move_rsp(
    responded_to: u16,
    sop_class: &str,
    status: u16,
    ops: crate::query::SubOperations,
    comment: Option<&str>,
) -> Vec<u8> {
    let b = Builder::default()
        .uid(AFFECTED_SOP_CLASS, sop_class)
        .us(COMMAND_FIELD, C_MOVE_RSP)
        .us(RESPONDED_TO, responded_to)
        .us(DATASET_TYPE, NO_DATASET)
        .us(STATUS, status)
        .comment(comment);
    let b = if is_pending(status) {
        b.us(REMAINING, ops.remaining)
    } else {
        b
    };
    b.us(COMPLETED, ops.completed)
        .us(FAILED, ops.failed)
        .us(WARNING, ops.warning)
        .finish()
}

/// Pending statuses of C-FIND/C-MOVE (more responses follow).
pub fn is_pending(status: u16) -> bool {
    status == 0xFF00 || status == 0xFF01
}

/// What a C-STORE-RSP status means for delivery (PS3.4 B.2.3 / PS3.7 C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// Success or Warning: the destination has the instance.
    Delivered,
    /// Worth retrying later (resources, processing failure, cancel).
    Transient,
    /// Will fail again the same way: dead-letter.
    Permanent,
}

pub fn classify_store_status(status: u16) -> StatusClass {
    match status {
        0x0000 | 0x0001 | 0x0107 | 0x0116 => StatusClass::Delivered,
        s if s & 0xF000 == 0xB000 => StatusClass::Delivered,
        s if s & 0xFF00 == 0xA700 => StatusClass::Transient,
        0x0110 | 0x0213 | 0xFE00 => StatusClass::Transient,
        _ => StatusClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_rq_round_trips() {
        let rq = c_store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", 1);
        let c = Command::parse(&rq).expect("parse");
        assert_eq!(c.command_field(), Ok(C_STORE_RQ));
        assert_eq!(c.message_id(), Some(7));
        assert_eq!(c.priority(), 1);
        assert!(c.has_dataset());
        assert_eq!(c.affected_sop_instance().as_deref(), Some("1.2.3.4.5"));
        assert_eq!(
            c.affected_sop_class().as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        // group length covers the rest
        let gl = u32::from_le_bytes([rq[8], rq[9], rq[10], rq[11]]) as usize;
        assert_eq!(gl, rq.len() - 12);
    }

    #[test]
    fn rsp_carries_status_and_comment() {
        let rsp = c_store_rsp(
            3,
            "1.2",
            "1.2.3",
            status::OUT_OF_RESOURCES,
            Some("spool full"),
        );
        let c = Command::parse(&rsp).expect("parse");
        assert_eq!(c.status(), Some(0xA700));
        assert_eq!(c.responded_to(), Some(3));
        assert!(!c.has_dataset());
        assert_eq!(c.error_comment().as_deref(), Some("spool full"));
    }

    #[test]
    fn truncated_command_is_an_error() {
        let rq = c_store_rq(7, "1.2", "1.2.3", 0);
        for cut in [3, 9, rq.len() - 1] {
            assert!(Command::parse(&rq[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn classification_follows_the_standard() {
        assert_eq!(classify_store_status(0x0000), StatusClass::Delivered);
        assert_eq!(classify_store_status(0xB000), StatusClass::Delivered);
        assert_eq!(classify_store_status(0xB007), StatusClass::Delivered);
        assert_eq!(classify_store_status(0xA700), StatusClass::Transient);
        assert_eq!(classify_store_status(0xA7FF), StatusClass::Transient);
        assert_eq!(classify_store_status(0xA900), StatusClass::Permanent);
        assert_eq!(classify_store_status(0xC000), StatusClass::Permanent);
        assert_eq!(classify_store_status(0x0122), StatusClass::Permanent);
    }
}
