//! One PDU at a time on an async byte stream.
//!
//! The 6-byte header is checked before the body is read, so a peer that
//! announces a 4 GB PDU (or sends garbage) costs nothing but a closed
//! connection. Bodies are parsed with dicom-ul's `read_pdu`.

use bytes::BytesMut;
use dicom_ul::pdu::{Pdu, MAXIMUM_PDU_SIZE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest non-P-DATA PDU accepted (association requests with many contexts
/// and user identity stay far below this).
const MAX_CONTROL_PDU: u32 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer closed the connection")]
    Closed,
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown PDU type 0x{0:02X} (not DICOM, or a corrupted stream)")]
    UnknownType(u8),
    #[error(
        "PDU of type 0x{pdu_type:02X} announces {length} bytes, more than the {limit} allowed"
    )]
    TooLarge {
        pdu_type: u8,
        length: u32,
        limit: u32,
    },
    #[error("malformed PDU of type 0x{pdu_type:02X}: {detail}")]
    Malformed { pdu_type: u8, detail: String },
}

/// Reads one PDU. `max_pdata` bounds P-DATA bodies (our negotiated maximum).
pub async fn read_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_pdata: u32,
) -> Result<Pdu, WireError> {
    let mut header = [0u8; 6];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let pdu_type = header[0];
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let limit = match pdu_type {
        0x04 => max_pdata,
        0x01..=0x07 => MAX_CONTROL_PDU,
        other => return Err(WireError::UnknownType(other)),
    };
    if length > limit {
        return Err(WireError::TooLarge {
            pdu_type,
            length,
            limit,
        });
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(6 + length as usize, 0);
    reader.read_exact(&mut buf[6..]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Malformed {
                pdu_type,
                detail: format!("connection closed inside a {length}-byte PDU"),
            }
        } else {
            WireError::Io(e)
        }
    })?;
    match dicom_ul::pdu::read_pdu(&buf[..], MAXIMUM_PDU_SIZE, false) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(WireError::Malformed {
            pdu_type,
            detail: "incomplete PDU".into(),
        }),
        Err(e) => Err(WireError::Malformed {
            pdu_type,
            detail: e.to_string(),
        }),
    }
}

/// Writes one PDU.
pub async fn write_pdu<W: AsyncWrite + Unpin>(writer: &mut W, pdu: &Pdu) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(256);
    dicom_ul::pdu::write_pdu(&mut out, pdu).map_err(|e| WireError::Malformed {
        pdu_type: 0,
        detail: format!("cannot encode outgoing PDU: {e}"),
    })?;
    writer.write_all(&out).await?;
    Ok(())
}

/// Bytes of PDU + PDV headers in front of each P-DATA fragment.
pub const PDATA_OVERHEAD: usize = 12;

/// Fills the 12 header bytes in front of a fragment already placed at
/// `frame[12..]`, so one fragment goes out in one write without a copy.
pub fn frame_pdata(frame: &mut [u8], pc_id: u8, command: bool, last: bool) {
    let data_len = frame.len() - PDATA_OVERHEAD;
    let pdv_len = (data_len + 2) as u32;
    let pdu_len = pdv_len + 4;
    frame[0] = 0x04;
    frame[1] = 0;
    frame[2..6].copy_from_slice(&pdu_len.to_be_bytes());
    frame[6..10].copy_from_slice(&pdv_len.to_be_bytes());
    frame[10] = pc_id;
    frame[11] = u8::from(command) | (u8::from(last) << 1);
}

/// Sends a whole (small) message — a command set — as one P-DATA PDU.
pub async fn send_command<W: AsyncWrite + Unpin>(
    writer: &mut W,
    pc_id: u8,
    bytes: &[u8],
) -> Result<(), WireError> {
    let mut frame = vec![0u8; PDATA_OVERHEAD + bytes.len()];
    frame[PDATA_OVERHEAD..].copy_from_slice(bytes);
    frame_pdata(&mut frame, pc_id, true, true);
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{PDataValue, PDataValueType};

    #[tokio::test]
    async fn framed_pdata_parses_back() {
        let mut frame = vec![0u8; PDATA_OVERHEAD + 4];
        frame[PDATA_OVERHEAD..].copy_from_slice(b"abcd");
        frame_pdata(&mut frame, 3, false, true);
        let mut buf = BytesMut::new();
        let pdu = read_pdu(&mut &frame[..], &mut buf, 16384)
            .await
            .expect("parse");
        assert_eq!(
            pdu,
            Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: 3,
                    value_type: PDataValueType::Data,
                    is_last: true,
                    data: b"abcd".to_vec()
                }]
            }
        );
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors_not_panics() {
        let mut buf = BytesMut::new();
        let garbage = b"GET / HTTP/1.1\r\n\r\n";
        assert!(matches!(
            read_pdu(&mut &garbage[..], &mut buf, 16384).await,
            Err(WireError::UnknownType(b'G'))
        ));
        let huge = [0x04, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_pdu(&mut &huge[..], &mut buf, 16384).await,
            Err(WireError::TooLarge { .. })
        ));
        let truncated = [0x01, 0, 0, 0, 0, 100, 0, 1];
        assert!(matches!(
            read_pdu(&mut &truncated[..], &mut buf, 16384).await,
            Err(WireError::Malformed { .. })
        ));
        let nonsense_body = [0x01, 0, 0, 0, 0, 4, 0, 1, 0, 0];
        assert!(read_pdu(&mut &nonsense_body[..], &mut buf, 16384)
            .await
            .is_err());
        assert!(matches!(
            read_pdu(&mut &[][..], &mut buf, 16384).await,
            Err(WireError::Closed)
        ));
    }
}
