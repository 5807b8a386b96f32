//! Payload sealing: ChaCha20-Poly1305 in chunks, as the data streams in.
//!
//! File layout: `KKSE`, version 1, a 7-byte random nonce prefix, then
//! chunks of up to 64 KiB of plaintext, each followed by its 16-byte tag.
//! Nonce = prefix ‖ chunk counter (u32, big endian) ‖ last-chunk flag, the
//! STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár): chunks cannot
//! be reordered, dropped or appended, and a truncated file fails because its
//! last chunk does not carry the flag. Associated data binds the file to its
//! instance: the spool id and the SOP Instance UID. No plaintext is ever
//! written to disk, temp files included.

use std::io::{Read, Write};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 4] = b"KKSE";
const VERSION: u8 = 1;
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
pub const HEADER_LEN: usize = 4 + 1 + 7;

/// The spool's data key (unsealed from the TPM at start).
#[derive(Clone)]
pub struct SpoolKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SpoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpoolKey(..)")
    }
}

impl SpoolKey {
    pub fn new(bytes: Zeroizing<[u8; 32]>) -> Self {
        SpoolKey(bytes)
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.0[..]))
    }

    /// Seals a short value (a field of the index) bound to `aad`: base64-free
    /// hex of nonce ‖ ciphertext ‖ tag.
    pub fn seal_value(&self, aad: &[u8], value: &str) -> String {
        let mut nonce = [0u8; 12];
        random(&mut nonce);
        let mut buf = value.as_bytes().to_vec();
        // Encryption of an in-memory buffer cannot fail for these sizes.
        let _ = self
            .cipher()
            .encrypt_in_place(Nonce::from_slice(&nonce), aad, &mut buf);
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        hex::encode(out)
    }

    pub fn open_value(&self, aad: &[u8], sealed: &str) -> Option<String> {
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() < 12 + TAG {
            return None;
        }
        let (nonce, ct) = bytes.split_at(12);
        let mut buf = ct.to_vec();
        self.cipher()
            .decrypt_in_place(Nonce::from_slice(nonce), aad, &mut buf)
            .ok()?;
        String::from_utf8(buf).ok()
    }
}

/// Fills `buf` from the kernel's generator.
pub fn random(buf: &mut [u8]) {
    // /dev/urandom never blocks after boot and never fails short on Linux;
    // if it cannot be read at all the box is broken beyond this spool.
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
    if let Err(e) = ok {
        panic!("cannot read /dev/urandom: {e}");
    }
}

fn aad(id: u64, sop_instance_uid: &str) -> Vec<u8> {
    let mut a = b"KKSE1".to_vec();
    a.extend_from_slice(&id.to_be_bytes());
    a.extend_from_slice(sop_instance_uid.as_bytes());
    a
}

fn nonce(prefix: &[u8; 7], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Encrypts everything written to it into `inner`.
pub struct SealWriter<W: Write> {
    inner: W,
    cipher: ChaCha20Poly1305,
    prefix: [u8; 7],
    aad: Vec<u8>,
    counter: u32,
    buf: Zeroizing<Vec<u8>>,
}

impl<W: Write> std::fmt::Debug for SealWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealWriter")
            .field("chunks", &self.counter)
            .finish_non_exhaustive()
    }
}

impl<W: Write> SealWriter<W> {
    pub fn new(
        mut inner: W,
        key: &SpoolKey,
        id: u64,
        sop_instance_uid: &str,
    ) -> std::io::Result<Self> {
        let mut prefix = [0u8; 7];
        random(&mut prefix);
        inner.write_all(MAGIC)?;
        inner.write_all(&[VERSION])?;
        inner.write_all(&prefix)?;
        Ok(SealWriter {
            inner,
            cipher: key.cipher(),
            prefix,
            aad: aad(id, sop_instance_uid),
            counter: 0,
            buf: Zeroizing::new(Vec::with_capacity(CHUNK + TAG)),
        })
    }

    fn flush_chunk(&mut self, last: bool) -> std::io::Result<()> {
        let n = nonce(&self.prefix, self.counter, last);
        self.cipher
            .encrypt_in_place(Nonce::from_slice(&n), &self.aad, &mut *self.buf)
            .map_err(|_| std::io::Error::other("chunk encryption failed"))?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("payload too large to seal (2^32 chunks)"))?;
        Ok(())
    }

    /// Seals the last chunk and returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.flush_chunk(true)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            // A full chunk is never the last: the last one is always short
            // (possibly empty), so a reader can tell without looking ahead.
            if self.buf.len() == CHUNK {
                self.flush_chunk(false)?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts a sealed file; any tampering surfaces as an `InvalidData` error
/// naming the chunk, before that chunk's plaintext is released.
pub struct SealReader<R: Read> {
    inner: R,
    cipher: ChaCha20Poly1305,
    prefix: [u8; 7],
    aad: Vec<u8>,
    counter: u32,
    plain: Zeroizing<Vec<u8>>,
    pos: usize,
    done: bool,
}

impl<R: Read> std::fmt::Debug for SealReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealReader")
            .field("chunk", &self.counter)
            .finish_non_exhaustive()
    }
}

fn tampered(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl<R: Read> SealReader<R> {
    /// `inner` positioned after [`MAGIC`] (see [`is_sealed`]).
    pub fn new(
        mut inner: R,
        key: &SpoolKey,
        id: u64,
        sop_instance_uid: &str,
    ) -> std::io::Result<Self> {
        let mut head = [0u8; 8];
        inner.read_exact(&mut head)?;
        if head[0] != VERSION {
            return Err(tampered(format!(
                "sealed payload version {} is not supported",
                head[0]
            )));
        }
        let mut prefix = [0u8; 7];
        prefix.copy_from_slice(&head[1..]);
        Ok(SealReader {
            inner,
            cipher: key.cipher(),
            prefix,
            aad: aad(id, sop_instance_uid),
            counter: 0,
            plain: Zeroizing::new(Vec::with_capacity(CHUNK + TAG)),
            pos: 0,
            done: false,
        })
    }

    fn next_chunk(&mut self) -> std::io::Result<()> {
        self.plain.clear();
        self.plain.resize(CHUNK + TAG, 0);
        let mut filled = 0;
        while filled < self.plain.len() {
            let n = self.inner.read(&mut self.plain[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        // Full chunks are never last; the last chunk is always short.
        let last = filled < CHUNK + TAG;
        self.plain.truncate(filled);
        if filled < TAG {
            return Err(tampered(format!(
                "sealed payload truncated at chunk {}",
                self.counter
            )));
        }
        let n = nonce(&self.prefix, self.counter, last);
        self.cipher
            .decrypt_in_place(Nonce::from_slice(&n), &self.aad, &mut *self.plain)
            .map_err(|_| {
                tampered(format!(
                    "sealed payload fails authentication at chunk {} (altered, truncated, or not this instance's file)",
                    self.counter
                ))
            })?;
        self.counter += 1;
        self.pos = 0;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for SealReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = (self.plain.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Whether a payload file starts with the sealed-file magic (Part 10 files
/// start with a 128-byte preamble and `DICM`, so the two never collide).
pub fn is_sealed(first4: &[u8]) -> bool {
    first4 == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SpoolKey {
        SpoolKey::new(Zeroizing::new([7u8; 32]))
    }

    fn seal(data: &[u8]) -> Vec<u8> {
        let mut w = SealWriter::new(Vec::new(), &key(), 42, "1.2.3").expect("writer");
        for part in data.chunks(1000) {
            w.write_all(part).expect("write");
        }
        w.finish().expect("finish")
    }

    fn open(file: &[u8], id: u64, uid: &str) -> std::io::Result<Vec<u8>> {
        assert!(is_sealed(&file[..4]));
        let mut r = SealReader::new(&file[4..], &key(), id, uid)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_chunk_boundary() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let file = seal(&data);
            assert_eq!(open(&file, 42, "1.2.3").expect("opens"), data, "len {len}");
            assert!(
                !file.windows(16).any(|w| len >= 16 && w == &data[..16]),
                "plaintext leaked"
            );
        }
    }

    #[test]
    fn any_change_is_caught() {
        let data: Vec<u8> = (0..(2 * CHUNK + 5)).map(|i| i as u8).collect();
        let file = seal(&data);
        for at in [
            4,
            HEADER_LEN,
            HEADER_LEN + 10,
            HEADER_LEN + CHUNK + TAG + 3,
            file.len() - 1,
        ] {
            let mut bad = file.clone();
            bad[at] ^= 1;
            let e = open(&bad, 42, "1.2.3").expect_err("flip must fail");
            assert!(
                e.kind() == std::io::ErrorKind::InvalidData || at == 4,
                "{at}: {e}"
            );
        }
        // Truncated at a chunk boundary, or the last chunk dropped.
        let cut = HEADER_LEN + CHUNK + TAG;
        assert!(open(&file[..cut], 42, "1.2.3").is_err());
        assert!(open(&file[..file.len() - 1], 42, "1.2.3").is_err());
        // Another instance's identity.
        assert!(open(&file, 43, "1.2.3").is_err());
        assert!(open(&file, 42, "1.2.4").is_err());
    }

    #[test]
    fn values_are_sealed_and_bound() {
        let k = key();
        let s = k.seal_value(b"id-1", "PID-001");
        assert!(!s.contains("PID"));
        assert_eq!(k.open_value(b"id-1", &s).as_deref(), Some("PID-001"));
        assert_eq!(k.open_value(b"id-2", &s), None);
    }
}
