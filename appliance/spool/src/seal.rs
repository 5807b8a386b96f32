//! Payload sealing: XChaCha20-Poly1305 in chunks, as the data streams in.
//!
//! File layout (version 2): `KKSE`, 2, the spool key's id (8 bytes), a
//! 19-byte random nonce prefix, then chunks of up to 64 KiB of plaintext,
//! each followed by its 16-byte tag. Nonce = prefix ‖ chunk counter (u32,
//! big endian) ‖ last-chunk flag, the STREAM construction (Hoang,
//! Reyhanitabar, Rogaway, Vizár): chunks cannot be reordered, dropped or
//! appended, and a truncated file fails because its last chunk does not carry
//! the flag. Associated data binds the file to its instance: the spool id and
//! the SOP Instance UID. No plaintext is ever written to disk.
//!
//! Why XChaCha: one spool key seals every payload of a box's life, and
//! version 1's 7 random bytes of nonce prefix (ChaCha20-Poly1305's 12-byte
//! nonce) reach a birthday collision after about 2^28 payloads, with a
//! collision reusing both keystream and Poly1305 key. 19 random bytes put
//! that beyond any box's life. Version 1 files are still read.
//!
//! The key id lets a reader tell "sealed with another key" (the TPM was
//! reset and the box re-provisioned: the key is lost, see [`OtherKey`]) from
//! tampering.
//!
//! The cipher is ring's ChaCha20-Poly1305 (RFC 8439, BoringSSL's assembly;
//! ring is already in the tree through boringtun), about twice as fast here as
//! the pure-Rust crate that sealed before, and every payload byte passes it
//! twice (sealed at reception, opened before sending). XChaCha20 is that
//! cipher under a subkey: HChaCha20(key, the nonce's first 16 bytes), with
//! the nonce's last 8 bytes after four zero bytes (draft-irtf-cfrg-xchacha);
//! a file's 16 first nonce bytes are its prefix's, so one subkey serves all
//! its chunks. The bytes are the same as before: the tests open what this
//! writes with the RustCrypto `chacha20poly1305` crate and the reverse.
//! Key bytes are kept in `Zeroizing` buffers; ring's key is built for each
//! chunk from them and lives only for the call.

use std::io::{Read, Write};

use chacha20::cipher::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use sha2::Digest as _;
use zeroize::{Zeroize as _, Zeroizing};

pub const MAGIC: &[u8; 4] = b"KKSE";
/// The version written; 1 is still read.
const VERSION: u8 = 2;
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const PREFIX_V1: usize = 7;
const PREFIX_V2: usize = 19;
pub const KEY_ID_LEN: usize = 8;
/// Bytes before the first chunk of a version 2 file.
pub const HEADER_LEN: usize = 4 + 1 + KEY_ID_LEN + PREFIX_V2;

/// The spool's data key (unsealed from the TPM at start).
#[derive(Clone)]
pub struct SpoolKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SpoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpoolKey({})", self.id_hex())
    }
}

/// A payload sealed with another spool key than the one this spool has:
/// not tampering, a lost key (see the module doc).
#[derive(Debug)]
pub struct OtherKey {
    pub found: String,
    pub ours: String,
}

impl std::fmt::Display for OtherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sealed with spool key {} but this box's spool key is {}",
            self.found, self.ours
        )
    }
}

impl std::error::Error for OtherKey {}

impl SpoolKey {
    pub fn new(bytes: Zeroizing<[u8; 32]>) -> Self {
        SpoolKey(bytes)
    }

    /// A public fingerprint of the key (SHA-256 of a label and the key, cut
    /// to 8 bytes): written in sealed files and the index so a lost key is
    /// told apart from tampering. It reveals nothing of the key.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        let mut h = sha2::Sha256::new();
        h.update(b"kakehashi spool key id");
        h.update(&self.0[..]);
        let mut out = [0u8; KEY_ID_LEN];
        out.copy_from_slice(&h.finalize()[..KEY_ID_LEN]);
        out
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id())
    }

    /// A keyed digest of `value` for finding it again without storing it
    /// (an Accession Number in the studies table): equal values give equal
    /// digests under this key, and nothing about the value without the key.
    /// The key is a fixed-length prefix, so length extension gives nothing.
    pub fn blind(&self, label: &str, value: &str) -> String {
        let mut h = sha2::Sha256::new();
        h.update(b"kakehashi blind\0");
        h.update(&self.0[..]);
        h.update(label.as_bytes());
        h.update([0u8]);
        h.update(value.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// Seals a short value (a field of the index) bound to `aad`: hex of a
    /// 24-byte random nonce ‖ ciphertext ‖ tag (XChaCha20-Poly1305).
    pub fn seal_value(&self, aad: &[u8], value: &str) -> String {
        let mut nonce = [0u8; 24];
        random(&mut nonce);
        let mut buf = value.as_bytes().to_vec();
        let (subkey, n) = xchacha(&self.0, &nonce);
        seal_chacha(&subkey, n, aad, &mut buf);
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        hex::encode(out)
    }

    /// Opens a value of [`SpoolKey::seal_value`].
    pub fn open_value(&self, aad: &[u8], sealed: &str) -> Option<String> {
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() < 24 + TAG {
            return None;
        }
        let (nonce, ct) = bytes.split_at(24);
        let mut buf = ct.to_vec();
        let mut n = [0u8; 24];
        n.copy_from_slice(nonce);
        let (subkey, n) = xchacha(&self.0, &n);
        open_chacha(&subkey, n, aad, &mut buf).then_some(())?;
        String::from_utf8(buf).ok()
    }

    /// Opens a value sealed by version 1 (12-byte nonce, ChaCha20-Poly1305).
    pub fn open_value_v1(&self, aad: &[u8], sealed: &str) -> Option<String> {
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() < 12 + TAG {
            return None;
        }
        let (nonce, ct) = bytes.split_at(12);
        let mut buf = ct.to_vec();
        let mut n = [0u8; 12];
        n.copy_from_slice(nonce);
        open_chacha(&self.0, n, aad, &mut buf).then_some(())?;
        String::from_utf8(buf).ok()
    }
}

/// The ChaCha20-Poly1305 subkey and 12-byte nonce that make up
/// XChaCha20-Poly1305 under `key` and the 24-byte `nonce`.
fn xchacha(key: &[u8; 32], nonce: &[u8; 24]) -> (Zeroizing<[u8; 32]>, [u8; 12]) {
    let mut first = [0u8; 16];
    first.copy_from_slice(&nonce[..16]);
    let mut sub = chacha20::hchacha::<U10>(key.into(), &first.into());
    let mut subkey = Zeroizing::new([0u8; 32]);
    subkey.copy_from_slice(&sub);
    sub.as_mut_slice().zeroize();
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&nonce[16..]);
    (subkey, n)
}

fn ring_key(key: &[u8; 32]) -> LessSafeKey {
    match UnboundKey::new(&CHACHA20_POLY1305, key) {
        Ok(k) => LessSafeKey::new(k),
        // ChaCha20-Poly1305 takes exactly the 32 bytes the type holds.
        Err(_) => unreachable!("a 32-byte ChaCha20 key is refused"),
    }
}

/// Encrypts `buf` in place and appends its tag (RFC 8439).
fn seal_chacha(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], buf: &mut Vec<u8>) {
    let k = ring_key(key);
    // ring refuses only inputs over ChaCha20's 256 GiB block-counter limit.
    match k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf) {
        Ok(tag) => buf.extend_from_slice(tag.as_ref()),
        Err(_) => unreachable!("a buffer in memory is under ChaCha20's limit"),
    }
}

/// Checks the tag at the end of `buf` and decrypts it in place (the tag
/// removed); false, and `buf` unspecified, if it does not authenticate.
fn open_chacha(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], buf: &mut Vec<u8>) -> bool {
    let k = ring_key(key);
    let len = match k.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf) {
        Ok(plain) => plain.len(),
        Err(_) => return false,
    };
    buf.truncate(len);
    true
}

/// The chunk cipher of one file: the ChaCha20-Poly1305 key of its chunks
/// and the nonce bytes before each chunk's counter and last-chunk flag.
struct Chunks {
    key: Zeroizing<[u8; 32]>,
    /// Version 1: the 7-byte prefix. Version 2: four zero bytes and the
    /// prefix's last 3 (its first 16 went into the subkey, see [`xchacha`]).
    lead: [u8; 7],
}

impl Chunks {
    fn v1(key: &SpoolKey, prefix: [u8; PREFIX_V1]) -> Self {
        Chunks {
            key: key.0.clone(),
            lead: prefix,
        }
    }

    fn v2(key: &SpoolKey, prefix: &[u8; PREFIX_V2]) -> Self {
        let mut nonce = [0u8; 24];
        nonce[..PREFIX_V2].copy_from_slice(prefix);
        let (key, n) = xchacha(&key.0, &nonce);
        let mut lead = [0u8; 7];
        lead.copy_from_slice(&n[..7]);
        Chunks { key, lead }
    }

    fn nonce(&self, counter: u32, last: bool) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(&self.lead);
        n[7..11].copy_from_slice(&counter.to_be_bytes());
        n[11] = u8::from(last);
        n
    }

    fn seal(&self, counter: u32, last: bool, aad: &[u8], buf: &mut Vec<u8>) {
        seal_chacha(&self.key, self.nonce(counter, last), aad, buf);
    }

    fn open(&self, counter: u32, last: bool, aad: &[u8], buf: &mut Vec<u8>) -> bool {
        open_chacha(&self.key, self.nonce(counter, last), aad, buf)
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

fn aad(version: u8, id: u64, sop_instance_uid: &str) -> Vec<u8> {
    let mut a = b"KKSE".to_vec();
    a.push(b'0' + version);
    a.extend_from_slice(&id.to_be_bytes());
    a.extend_from_slice(sop_instance_uid.as_bytes());
    a
}

/// Encrypts everything written to it into `inner` (always version 2).
pub struct SealWriter<W: Write> {
    inner: W,
    chunks: Chunks,
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
        let mut prefix = [0u8; PREFIX_V2];
        random(&mut prefix);
        inner.write_all(MAGIC)?;
        inner.write_all(&[VERSION])?;
        inner.write_all(&key.id())?;
        inner.write_all(&prefix)?;
        Ok(SealWriter {
            inner,
            chunks: Chunks::v2(key, &prefix),
            aad: aad(VERSION, id, sop_instance_uid),
            counter: 0,
            buf: Zeroizing::new(Vec::with_capacity(CHUNK + TAG)),
        })
    }

    fn flush_chunk(&mut self, last: bool) -> std::io::Result<()> {
        self.chunks
            .seal(self.counter, last, &self.aad, &mut self.buf);
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

/// Decrypts a sealed file (version 1 or 2); any tampering surfaces as an
/// `InvalidData` error naming the chunk, before that chunk's plaintext is
/// released. A file sealed with another key is an `InvalidInput` error
/// carrying [`OtherKey`].
pub struct SealReader<R: Read> {
    inner: R,
    chunks: Chunks,
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
        let mut version = [0u8; 1];
        inner.read_exact(&mut version)?;
        let chunks = match version[0] {
            1 => {
                let mut prefix = [0u8; PREFIX_V1];
                inner.read_exact(&mut prefix)?;
                Chunks::v1(key, prefix)
            }
            2 => {
                let mut key_id = [0u8; KEY_ID_LEN];
                inner.read_exact(&mut key_id)?;
                if key_id != key.id() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        OtherKey {
                            found: hex::encode(key_id),
                            ours: key.id_hex(),
                        },
                    ));
                }
                let mut prefix = [0u8; PREFIX_V2];
                inner.read_exact(&mut prefix)?;
                Chunks::v2(key, &prefix)
            }
            v => {
                return Err(tampered(format!(
                    "sealed payload version {v} is not supported"
                )))
            }
        };
        Ok(SealReader {
            inner,
            chunks,
            aad: aad(version[0], id, sop_instance_uid),
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
        if !self
            .chunks
            .open(self.counter, last, &self.aad, &mut self.plain)
        {
            return Err(tampered(format!(
                "sealed payload fails authentication at chunk {} (altered, truncated, or not this instance's file)",
                self.counter
            )));
        }
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
    // An independent implementation to prove the bytes are the standard's.
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce as RcNonce, XChaCha20Poly1305, XNonce};

    fn rustcrypto_v1() -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&[7u8; 32]))
    }

    fn rustcrypto() -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&[7u8; 32]))
    }

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
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{at}: {e}");
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
    fn version_2_is_xchacha_with_a_19_byte_random_prefix() {
        let data = b"some dataset bytes".to_vec();
        let a = seal(&data);
        let b = seal(&data);
        assert_eq!(&a[..5], b"KKSE\x02");
        assert_eq!(&a[5..13], &key().id());
        assert_ne!(a[13..32], b[13..32], "a fresh random prefix per file");
        // The one (last) chunk opens with XChaCha20-Poly1305 under the
        // nonce prefix ‖ counter 0 ‖ last flag.
        let mut nonce = [0u8; 24];
        nonce[..19].copy_from_slice(&a[13..32]);
        nonce[23] = 1;
        let mut chunk = a[HEADER_LEN..].to_vec();
        rustcrypto()
            .decrypt_in_place(XNonce::from_slice(&nonce), &aad(2, 42, "1.2.3"), &mut chunk)
            .expect("XChaCha20-Poly1305");
        assert_eq!(chunk, data);
    }

    #[test]
    fn what_the_rustcrypto_crate_sealed_still_opens() {
        // Version 2 files as kakehashi sealed them with the chacha20poly1305
        // crate (before ring): two chunks, the second the last.
        let data: Vec<u8> = (0..(CHUNK + 300)).map(|i| (i % 13) as u8).collect();
        let prefix = [0x5au8; PREFIX_V2];
        let mut file = b"KKSE\x02".to_vec();
        file.extend_from_slice(&key().id());
        file.extend_from_slice(&prefix);
        for (i, part) in [&data[..CHUNK], &data[CHUNK..]].iter().enumerate() {
            let mut nonce = [0u8; 24];
            nonce[..PREFIX_V2].copy_from_slice(&prefix);
            nonce[19..23].copy_from_slice(&(i as u32).to_be_bytes());
            nonce[23] = u8::from(i == 1);
            let mut buf = part.to_vec();
            rustcrypto()
                .encrypt_in_place(XNonce::from_slice(&nonce), &aad(2, 42, "1.2.3"), &mut buf)
                .expect("seal");
            file.extend_from_slice(&buf);
        }
        assert_eq!(open(&file, 42, "1.2.3").expect("opens"), data);
        let mut bad = file.clone();
        bad[HEADER_LEN + CHUNK + TAG + 1] ^= 1;
        assert!(open(&bad, 42, "1.2.3").is_err());
    }

    #[test]
    fn version_1_files_are_still_read() {
        // What kakehashi 0.1.0 wrote: KKSE, 1, 7-byte prefix, ChaCha20-Poly1305.
        let data: Vec<u8> = (0..(CHUNK + 100)).map(|i| (i % 7) as u8).collect();
        let prefix = [9u8; PREFIX_V1];
        let mut file = b"KKSE\x01".to_vec();
        file.extend_from_slice(&prefix);
        for (i, part) in [&data[..CHUNK], &data[CHUNK..]].iter().enumerate() {
            let mut nonce = [0u8; 12];
            nonce[..PREFIX_V1].copy_from_slice(&prefix);
            nonce[7..11].copy_from_slice(&(i as u32).to_be_bytes());
            nonce[11] = u8::from(i == 1);
            let mut buf = part.to_vec();
            rustcrypto_v1()
                .encrypt_in_place(RcNonce::from_slice(&nonce), &aad(1, 42, "1.2.3"), &mut buf)
                .expect("seal");
            file.extend_from_slice(&buf);
        }
        assert_eq!(open(&file, 42, "1.2.3").expect("reads v1"), data);
        let mut bad = file.clone();
        bad[20] ^= 1;
        assert!(open(&bad, 42, "1.2.3").is_err());
    }

    #[test]
    fn another_keys_file_is_a_lost_key_not_tampering() {
        let file = seal(b"data");
        let other = SpoolKey::new(Zeroizing::new([8u8; 32]));
        let e = SealReader::new(&file[4..], &other, 42, "1.2.3").expect_err("other key");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<OtherKey>());
        assert!(inner.is_some(), "{e}");
    }

    #[test]
    fn values_are_sealed_and_bound() {
        let k = key();
        let s = k.seal_value(b"id-1", "PID-001");
        assert!(!s.contains("PID"));
        assert_eq!(s.len(), 2 * (24 + 7 + TAG), "a 24-byte nonce");
        assert_eq!(k.open_value(b"id-1", &s).as_deref(), Some("PID-001"));
        assert_eq!(k.open_value(b"id-2", &s), None);
        // The standard's XChaCha20-Poly1305, both ways.
        let raw = hex::decode(&s).expect("hex");
        let mut ct = raw[24..].to_vec();
        rustcrypto()
            .decrypt_in_place(XNonce::from_slice(&raw[..24]), b"id-1", &mut ct)
            .expect("RustCrypto opens ours");
        assert_eq!(ct, b"PID-001");
        let mut theirs = b"PID-002".to_vec();
        rustcrypto()
            .encrypt_in_place(XNonce::from_slice(&[3u8; 24]), b"id-1", &mut theirs)
            .expect("seal");
        let theirs = hex::encode([&[3u8; 24][..], &theirs].concat());
        assert_eq!(k.open_value(b"id-1", &theirs).as_deref(), Some("PID-002"));
        // Version 1 values (12-byte nonce, ChaCha20-Poly1305) still open.
        let mut v1 = b"PID-001".to_vec();
        rustcrypto_v1()
            .encrypt_in_place(RcNonce::from_slice(&[5u8; 12]), b"id-1", &mut v1)
            .expect("seal v1");
        let v1 = hex::encode([&[5u8; 12][..], &v1].concat());
        assert_eq!(k.open_value_v1(b"id-1", &v1).as_deref(), Some("PID-001"));
    }
}
