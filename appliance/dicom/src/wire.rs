//! One PDU at a time on an async byte stream.
//!
//! The 6-byte header is checked before the body is read, so a peer that
//! announces a 4 GB PDU (or sends garbage) costs nothing but a closed
//! connection. Bodies are parsed with dicom-ul's `read_pdu`.

use bytes::{Bytes, BytesMut};
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

/// The 6-byte PDU header; a clean EOF before it is [`WireError::Closed`].
async fn read_header<R: AsyncRead + Unpin>(reader: &mut R) -> Result<[u8; 6], WireError> {
    let mut header = [0u8; 6];
    match reader.read_exact(&mut header).await {
        Ok(_) => Ok(header),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Reads one PDU. `max_pdata` bounds P-DATA bodies (our negotiated maximum).
pub async fn read_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_pdata: u32,
) -> Result<Pdu, WireError> {
    read_pdu_within(reader, buf, max_pdata, MAX_CONTROL_PDU).await
}

/// The first PDU of a connection, before anyone knows who is calling: any
/// type at most `limit` bytes (an A-ASSOCIATE-RQ with 128 contexts is about
/// 16 KiB), so an unknown peer costs little memory.
pub async fn read_first_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    limit: u32,
) -> Result<Pdu, WireError> {
    read_pdu_within(reader, buf, limit, limit).await
}

async fn read_pdu_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_pdata: u32,
    max_control: u32,
) -> Result<Pdu, WireError> {
    let header = read_header(reader).await?;
    let pdu_type = header[0];
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let limit = match pdu_type {
        0x04 => max_pdata,
        0x01..=0x07 => max_control,
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
    // Grown as bytes arrive, not to the announced length up front: a peer
    // that announces a large PDU and sends nothing holds nothing.
    let got = (&mut *reader)
        .take(u64::from(length))
        .read_buf_to_end(buf)
        .await?;
    if got < length as usize {
        return Err(WireError::Malformed {
            pdu_type,
            detail: format!("connection closed inside a {length}-byte PDU"),
        });
    }
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

/// Reads everything `reader` gives into `buf`; how many bytes that was.
trait ReadBufToEnd {
    async fn read_buf_to_end(&mut self, buf: &mut BytesMut) -> std::io::Result<usize>;
}

impl<R: AsyncRead + Unpin> ReadBufToEnd for R {
    async fn read_buf_to_end(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let mut total = 0;
        loop {
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            match self.read_buf(buf).await? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }
}

/// One presentation data value, sharing its PDU's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdv {
    pub pc_id: u8,
    pub command: bool,
    pub last: bool,
    pub data: Bytes,
}

/// A PDU as the ingress needs it: P-DATA split into values without copying
/// (the hot path), everything else parsed by dicom-ul.
#[derive(Debug)]
pub enum Frame {
    PData(Vec<Pdv>),
    Other(Pdu),
}

/// Reads one PDU; P-DATA bodies are read straight into `buf`'s spare
/// capacity and handed out as slices of it.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_pdata: u32,
) -> Result<Frame, WireError> {
    let header = read_header(reader).await?;
    if header[0] != 0x04 {
        let mut chained = &header[..];
        let mut rest = tokio::io::AsyncReadExt::chain(&mut chained, reader);
        return read_pdu(&mut rest, buf, max_pdata).await.map(Frame::Other);
    }
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    if length > max_pdata {
        return Err(WireError::TooLarge {
            pdu_type: 0x04,
            length,
            limit: max_pdata,
        });
    }
    let length = length as usize;
    buf.clear();
    buf.reserve(length);
    while buf.len() < length {
        let want = (length - buf.len()) as u64;
        let n = (&mut *reader).take(want).read_buf(buf).await?;
        if n == 0 {
            return Err(WireError::Malformed {
                pdu_type: 0x04,
                detail: format!("connection closed inside a {length}-byte PDU"),
            });
        }
    }
    let body = buf.split().freeze();
    let malformed = |detail: String| WireError::Malformed {
        pdu_type: 0x04,
        detail,
    };
    let mut values = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let head = body
            .get(pos..pos + 6)
            .ok_or_else(|| malformed(format!("truncated PDV item at byte {pos}")))?;
        let item_len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let end = pos + 4 + item_len;
        if item_len < 2 || end > body.len() {
            return Err(malformed(format!(
                "PDV item of {item_len} bytes at byte {pos} does not fit the PDU"
            )));
        }
        values.push(Pdv {
            pc_id: head[4],
            command: head[5] & 1 != 0,
            last: head[5] & 2 != 0,
            data: body.slice(pos + 6..end),
        });
        pos = end;
    }
    if values.is_empty() {
        return Err(malformed("P-DATA-TF without any value".into()));
    }
    Ok(Frame::PData(values))
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

/// Sends a dataset on `pc_id` in P-DATA PDUs no larger than the peer
/// accepts (`peer_max_pdu`, 0 = no limit; at most 1 MiB each).
pub async fn send_dataset<W: AsyncWrite + Unpin>(
    writer: &mut W,
    pc_id: u8,
    bytes: &[u8],
    peer_max_pdu: u32,
) -> Result<(), WireError> {
    let max = match peer_max_pdu {
        0 => 1 << 20,
        n => ((n.min(1 << 20) as usize).saturating_sub(6)).max(2) & !1,
    };
    let chunks: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(max).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut frame = vec![0u8; PDATA_OVERHEAD + chunk.len()];
        frame[PDATA_OVERHEAD..].copy_from_slice(chunk);
        frame_pdata(&mut frame, pc_id, false, i == last);
        writer.write_all(&frame).await?;
    }
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
    async fn frames_split_pdata_without_copying_and_parse_the_rest() {
        let mut two = vec![0u8; PDATA_OVERHEAD + 4];
        two[PDATA_OVERHEAD..].copy_from_slice(b"abcd");
        frame_pdata(&mut two, 5, true, false);
        // a second PDV in the same PDU
        two.extend_from_slice(&[0, 0, 0, 4, 5, 0b11, b'x', b'y']);
        let len = (two.len() - 6) as u32;
        two[2..6].copy_from_slice(&len.to_be_bytes());
        two.extend_from_slice(&[0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]); // A-RELEASE-RQ
        let mut input = &two[..];
        let mut buf = BytesMut::new();
        let Frame::PData(v) = read_frame(&mut input, &mut buf, 16384)
            .await
            .expect("pdata")
        else {
            panic!("expected P-DATA")
        };
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].pc_id, v[0].command, v[0].last, &v[0].data[..]),
            (5, true, false, &b"abcd"[..])
        );
        assert_eq!(
            (v[1].command, v[1].last, &v[1].data[..]),
            (true, true, &b"xy"[..])
        );
        assert!(matches!(
            read_frame(&mut input, &mut buf, 16384).await,
            Ok(Frame::Other(Pdu::ReleaseRQ))
        ));
        let bad = [0x04, 0, 0, 0, 0, 6, 0, 0, 0, 9, 1, 2];
        assert!(matches!(
            read_frame(&mut &bad[..], &mut buf, 16384).await,
            Err(WireError::Malformed { .. })
        ));
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
