//! The DICOM upper layer as Kakehashi needs it.
//!
//! Built on dicom-ul's PDU codec ([`dicom_ul::pdu`]); the association logic
//! is ours because a relay must accept what dicom-ul 0.10's acceptor will
//! not: any transfer syntax as-is (its acceptor only takes syntaxes its
//! registry can decode, so deflate without a feature and private syntaxes are
//! refused), rejection by source address, and P-DATA handed over fragment by
//! fragment so an instance is never held whole in memory.
//!
//! - [`wire`]: read/write one PDU on an async stream, with a size limit
//! - [`negotiate`]: A-ASSOCIATE-RQ → AC or RJ, a pure function
//! - [`scp`]: the rest of an association as the SCP: PDVs in, actions out
//!   (C-STORE, C-ECHO; C-FIND/C-MOVE identifiers handed to the driver)
//! - [`dimse`]: command sets (C-ECHO, C-STORE) in implicit VR little endian
//! - [`scan`]: study and patient IDs from the first bytes of a dataset, and
//!   a report's title, finding, time and physician (urgent notices)
//! - [`part10`]: the file meta header that makes a spooled payload a Part 10 file
//! - [`scu`]: the SCU: C-STORE for the forwarder, C-ECHO for the self-test,
//!   C-FIND, C-MOVE and C-GET (SCP role for its C-STOREs) for prefetching
//!   priors from the hospital's PACS; within a C-STORE its timeouts count
//!   time without progress
//! - [`sendq`]: a connection's unacknowledged bytes (that progress)
//! - [`query`]: query/retrieve identifiers (implicit VR LE, text values)
//! - [`signature`]: verifies a result's DICOM digital signatures (PS3.15)
//!
//! Not here: TLS; answering C-GET. An asynchronous
//! operations window is answered with 1/1: one outstanding operation per
//! association, in both directions.

#![forbid(unsafe_code)]

pub mod dimse;
pub mod negotiate;
pub mod part10;
pub mod query;
pub mod scan;
pub mod scp;
pub mod scu;
pub mod sendq;
pub mod signature;
pub mod uids;
pub mod wire;

/// Kakehashi's implementation class UID (a 2.25 UUID-derived UID).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.92377486244339045301182542746108877573";
/// Implementation version name sent in associations and file meta headers.
pub const IMPLEMENTATION_VERSION_NAME: &str = "KAKEHASHI_010";

/// Days since 1970-01-01 of a DICOM DA (`YYYYMMDD`); `None` if it is not
/// one (priors' ages, signature times).
pub fn days_from_da(da: &str) -> Option<i64> {
    let da = da.trim();
    if da.len() != 8 || !da.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = da[..4].parse().ok()?;
    let m: i64 = da[4..6].parse().ok()?;
    let d: i64 = da[6..].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_days() {
        assert_eq!(days_from_da("19700101"), Some(0));
        assert_eq!(days_from_da("20000301"), Some(11_017));
        assert_eq!(days_from_da("2000-03-01"), None);
        assert_eq!(days_from_da("20001301"), None);
    }
}
