//! Segment files: where payloads are appended, so that accepting an
//! instance costs one data flush.
//!
//! A segment (`seg/<n>.seg`) is a file of fixed size, allocated
//! (`fallocate`) and flushed once when it is made and then only overwritten:
//! appending a payload to it changes no file size and no block map (its
//! first pass only marks reserved blocks written), so `fdatasync` is one
//! device flush (creating a file, renaming it and syncing its directory is
//! three). Segments whose payloads have all left the spool are used again
//! from their start; a few are kept ready, the rest deleted.
//!
//! A frame per instance, aligned to 4 KiB:
//!
//! ```text
//! header (512 bytes): "KKSG", version, flags (void), lsn, payload length,
//!                     body length, first 16 bytes of
//!                     SHA-256(header fields ‖ body)
//! payload            the Part 10 file as received (sealed with a key)
//! body               the log entry: the instance's record and what the
//!                    index needs to accept it again (see `crate::LogEntry`)
//! ```
//!
//! Header, payload and body are written, then the frame is flushed once
//! (shared with concurrent frames, see below); only then is the index
//! updated, without waiting for its own flush. The log sequence number
//! (lsn) orders the frames: at start, frames newer than the index's last
//! durable lsn are verified (header
//! digest, then the payload's own digest or seal) and applied again, in lsn
//! order, so the index ends where it was when the power went. A frame torn
//! by the power cut fails its check and was never acknowledged. A frame
//! whose index update failed is marked void (the instance was refused), not
//! wiped: the frames after it in its segment stay reachable.
//!
//! Concurrent frames share flushes (group commit, [`Flusher`]). Each
//! association appends to a segment of its own, so sharing a flush means
//! sharing a device cache flush across files: a frame is written out
//! (`sync_file_range`, waiting for the writes to complete, no cache flush)
//! and then waits for one `fdatasync` of any spool file that *began after*
//! its writes completed: whoever finds no such flush running starts one and
//! the others that wrote out meanwhile wait for it. On ext4 this is only
//! sound where the frame changes no file-system metadata: the first write
//! into a block `fallocate` reserved turns it from unwritten to written,
//! a journal entry that only the segment's own `fdatasync` commits. So a
//! segment keeps a *written-through* mark (the end of the region whose
//! blocks are known written and committed): a frame wholly below it takes
//! the shared flush; a frame above it (a segment's first pass) is flushed
//! by its own `fdatasync`, which moves the mark past it. At start every
//! segment is flushed once and its mark set at the end of its frames. A
//! segment used again (the steady state of a box) is below its mark.
//!
//! While a payload arrives its write-out is started early, every
//! [`EARLY_WRITE_OUT`] bytes, on a thread of its own (see
//! [`EarlyWriteOut`]); the frame's flush still writes out and waits for
//! all of it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use sha2::{Digest, Sha256};

use crate::{io, SpoolError};

pub(crate) const MAGIC: &[u8; 4] = b"KKSG";
const VERSION: u8 = 1;
/// Header flag: the frame's instance was refused after its flush; its log
/// entry is never applied.
const FLAG_VOID: u8 = 1;
/// Bytes before a frame's payload.
pub(crate) const HEADER_LEN: u64 = 512;
/// Frames start on these boundaries (no two frames share a block).
pub(crate) const ALIGN: u64 = 4096;
/// Room kept at the end of a frame for its body; a larger body moves the
/// payload to a file of its own.
pub(crate) const BODY_ROOM: u64 = 16 * 1024;
/// A segment with less room left than this (or a quarter of it) takes no
/// new frame.
const MIN_ROOM: u64 = 64 * 1024;
/// Emptied segments kept ready for use (the rest are deleted): one per
/// association of a busy modality or two, so that their frames land below
/// written-through marks and share flushes (at most an eighth of the spool).
const KEEP_FREE: usize = 8;

/// Where a payload lies in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// Segment number.
    pub seg: u32,
    /// Offset of the payload's first byte in the segment file.
    pub at: u64,
}

fn min_room(size: u64) -> u64 {
    MIN_ROOM.min(size / 4)
}

pub(crate) fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// The segment size for a spool of `max_size` bytes: 64 MiB, smaller for
/// small spools (a 64th of the spool, at least 64 KiB).
pub(crate) fn size_for(max_size: u64) -> u64 {
    align((max_size / 64).clamp(64 << 10, 64 << 20))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Nothing in it is needed: written again from its start.
    Free,
    /// Takes frames from `pos`.
    Open,
    /// A writer is appending to it.
    Writing,
    /// Full (or written before this start): waits for its payloads to go.
    Closed,
}

#[derive(Debug)]
struct Seg {
    file: Arc<File>,
    status: Status,
    pos: u64,
    /// Records whose payload is in this segment, and their bytes.
    live: u64,
    live_bytes: u64,
    /// The newest frame written in it.
    max_lsn: u64,
    /// Frames taken and not yet finished ([`Writer`]s alive): from the
    /// first payload byte until the record holds the payload (or the
    /// instance was refused), the segment is not reclaimed, whatever the
    /// durable lsn says.
    busy: u32,
    /// Written through: every block below it was written by a frame that
    /// was flushed by the segment's own `fdatasync` (or found at start and
    /// flushed then), so overwriting it changes no metadata.
    through: u64,
    /// Where the frames found at start-up end.
    found_end: u64,
}

#[derive(Debug, Default)]
struct State {
    segs: BTreeMap<u32, Seg>,
    next_no: u32,
    /// [`Segments::settle`] ran: which segments hold payloads is known.
    /// Until then nothing is reclaimed (every segment counts as holding
    /// payloads).
    settled: bool,
}

#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    size: u64,
    state: Arc<Mutex<State>>,
    flusher: Arc<Flusher>,
    /// Starts the write-out of payloads while they are still arriving
    /// (see [`Writer::append`]); `None` if its thread could not start.
    early: Option<EarlyWriteOut>,
}

/// Where [`Writer::append`] hands the regions of a payload written so far
/// to be written out early: a thread of the spool's own starts their
/// write-out (`sync_file_range(WRITE)`, which may wait for the device's
/// queue) while the receiving thread goes on receiving. The frame's flush
/// then finds most of its pages written and waits only for the rest.
/// Nothing relies on it for durability: the flush writes out and waits for
/// the whole frame as before.
type EarlyWriteOut = std::sync::mpsc::Sender<(Arc<File>, u64, u64)>;

/// How much of a payload is appended before its write-out is started early.
const EARLY_WRITE_OUT: u64 = 256 << 10;

fn early_write_out_thread() -> Option<EarlyWriteOut> {
    let (tx, rx) = std::sync::mpsc::channel::<(Arc<File>, u64, u64)>();
    std::thread::Builder::new()
        .name("spool-writeout".into())
        .spawn(move || {
            // Ends when the segments and their writers are gone.
            for (file, at, len) in rx {
                // An error shows again in the frame's own flush.
                let _ = sync_file_range(&file, at, len, libc::SYNC_FILE_RANGE_WRITE);
            }
        })
        .ok()?;
    Some(tx)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A segment taken by one incoming instance. While it lives the segment
/// is busy (never reclaimed); [`Writer::hold`] counts the payload as the
/// record's before it goes.
#[derive(Debug)]
pub(crate) struct Writer {
    pub seg: u32,
    pub file: Arc<File>,
    /// The frame's first byte (its header).
    pub start: u64,
    /// Payload bytes written so far.
    pub written: u64,
    size: u64,
    /// The segment's written-through mark when it was taken (only this
    /// writer's own flush moves it while it lives).
    through: u64,
    state: Arc<Mutex<State>>,
    flusher: Arc<Flusher>,
    early: Option<EarlyWriteOut>,
    /// Where the early write-out of this frame has been started up to.
    started: u64,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(g) = lock(&self.state).segs.get_mut(&self.seg) {
            g.busy = g.busy.saturating_sub(1);
        }
    }
}

impl Writer {
    /// The index holds a record whose payload (`bytes`) is this frame's:
    /// the segment keeps it until [`Segments::release`].
    pub fn hold(&self, bytes: u64) {
        if let Some(g) = lock(&self.state).segs.get_mut(&self.seg) {
            g.live += 1;
            g.live_bytes += bytes;
        }
    }

    /// Payload bytes this frame can still take.
    pub fn room(&self) -> u64 {
        self.size
            .saturating_sub(self.start + HEADER_LEN + self.written + BODY_ROOM)
    }

    pub fn payload_at(&self) -> u64 {
        self.start + HEADER_LEN
    }

    /// Appends payload bytes (the caller checked [`Writer::room`]). Every
    /// [`EARLY_WRITE_OUT`] bytes the whole pages written so far are handed
    /// to the early write-out (pages this frame will not write again; the
    /// frame's first page, which its header goes into, is left to the flush).
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file
            .write_all_at(bytes, self.payload_at() + self.written)?;
        self.written += bytes.len() as u64;
        let done = (self.payload_at() + self.written) & !(ALIGN - 1);
        let from = self.started.max(self.start + ALIGN);
        if done >= from + EARLY_WRITE_OUT {
            if let Some(early) = &self.early {
                let _ = early.send((Arc::clone(&self.file), from, done - from));
            }
            self.started = done;
        }
        Ok(())
    }

    /// Copies the payload written so far to `out`.
    pub fn copy_to(
        &self,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < self.written {
            let n = (self.written - done).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], self.payload_at() + done)?;
            out(&buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Writes the body and then the header of the frame, and flushes it:
    /// the one flush of an acknowledgement, shared with concurrent frames
    /// when the frame lies below the segment's written-through mark (see
    /// the module's doc). Returns where the next frame may start.
    pub fn seal_frame(&self, lsn: u64, body: &[u8]) -> std::io::Result<u64> {
        let body_at = self.payload_at() + self.written;
        self.file.write_all_at(body, body_at)?;
        self.file
            .write_all_at(&header(lsn, self.written, body), self.start)?;
        let end = align(body_at + body.len() as u64);
        if end <= self.through {
            write_out(&self.file, self.start, end - self.start)?;
            self.flusher.join(&self.file)?;
        } else {
            self.flusher.own(&self.file)?;
            let mut s = lock(&self.state);
            if let Some(g) = s.segs.get_mut(&self.seg) {
                if self.start <= g.through {
                    g.through = g.through.max(end);
                }
            }
        }
        Ok(end)
    }

    /// Marks the frame sealed as `lsn` with `body` void (an index update
    /// failed after its flush: the instance was refused and must not come
    /// back at the next start). Its lengths stay, so that the frames other
    /// writers appended after it are still found.
    pub fn void_frame(&self, lsn: u64, body: &[u8]) {
        let _ = self
            .file
            .write_all_at(&header_with(FLAG_VOID, lsn, self.written, body), self.start);
        let _ = self.file.sync_data();
    }
}

fn header(lsn: u64, payload_len: u64, body: &[u8]) -> Vec<u8> {
    header_with(0, lsn, payload_len, body)
}

fn header_with(flags: u8, lsn: u64, payload_len: u64, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = flags;
    h[8..16].copy_from_slice(&lsn.to_le_bytes());
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    h[24..28].copy_from_slice(&(body.len() as u32).to_le_bytes());
    let digest = frame_digest(&h[0..32], body);
    h[32..48].copy_from_slice(&digest);
    h
}

fn frame_digest(fields: &[u8], body: &[u8]) -> [u8; 16] {
    let mut d = Sha256::new();
    d.update(fields);
    d.update(body);
    let full = d.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A frame found at start-up.
#[derive(Debug)]
pub(crate) struct Frame {
    pub lsn: u64,
    pub loc: Location,
    pub payload_len: u64,
    pub body: Vec<u8>,
}

impl Segments {
    /// Opens the segments of `dir/seg` (creating the directory). Every
    /// segment found is closed until [`Segments::settle`] says which are
    /// free.
    pub fn open(dir: &Path, size: u64) -> Result<Segments, SpoolError> {
        let dir = dir.join("seg");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut state = State::default();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name();
            let Some(no) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u32::from_str_radix(n, 16).ok())
            else {
                tracing::warn!(file = %entry.path().display(), "unexpected file in the spool's segment directory left alone");
                continue;
            };
            let path = entry.path();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            state.next_no = state.next_no.max(no + 1);
            state.segs.insert(
                no,
                Seg {
                    file: Arc::new(file),
                    status: Status::Closed,
                    pos: 0,
                    live: 0,
                    live_bytes: 0,
                    max_lsn: u64::MAX,
                    busy: 0,
                    through: 0,
                    found_end: 0,
                },
            );
        }
        Ok(Segments {
            dir,
            size,
            state: Arc::new(Mutex::new(state)),
            flusher: Arc::default(),
            early: early_write_out_thread(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn path(&self, seg: u32) -> PathBuf {
        self.dir.join(format!("{seg:08x}.seg"))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Payloads held in segments (tests).
    #[cfg(test)]
    pub fn live(&self) -> u64 {
        self.state().segs.values().map(|g| g.live).sum()
    }

    /// (flushes made, frames that shared another's flush).
    pub fn flush_counts(&self) -> (u64, u64) {
        self.flusher.counts()
    }

    /// Bytes of the payloads held in segments.
    pub fn live_bytes(&self) -> u64 {
        self.state().segs.values().map(|g| g.live_bytes).sum()
    }

    /// The length of every segment file found.
    pub fn lengths(&self) -> BTreeMap<u32, u64> {
        self.state()
            .segs
            .iter()
            .filter_map(|(n, g)| Some((*n, g.file.metadata().ok()?.len())))
            .collect()
    }

    /// Bytes of segment files on disk.
    pub fn allocated(&self) -> u64 {
        let s = self.state();
        s.segs.len() as u64 * self.size
    }

    /// Every frame with an lsn above `after`, in no particular order, with
    /// the segment's own file to read payloads from. Stops in each segment at
    /// the first block that is not a frame header.
    pub fn scan(&self, after: u64) -> Result<Vec<Frame>, SpoolError> {
        let segs: Vec<(u32, Arc<File>)> = self
            .state()
            .segs
            .iter()
            .map(|(n, s)| (*n, Arc::clone(&s.file)))
            .collect();
        let mut out = Vec::new();
        let mut max_lsn: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for (no, file) in segs {
            let path = self.path(no);
            let len = file.metadata().map_err(io(&path))?.len();
            let mut at = 0u64;
            let mut h = [0u8; HEADER_LEN as usize];
            // The lsn of the frame before in this segment: one writer at a
            // time appends to a segment, so its frames' lsns rise; a lower
            // one is left from before the segment was reused, and the
            // segment's log ends there.
            let mut newest = 0u64;
            while at + HEADER_LEN <= len {
                if file.read_exact_at(&mut h, at).is_err() || &h[0..4] != MAGIC || h[4] != VERSION {
                    break;
                }
                let lsn = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
                if lsn <= newest {
                    break;
                }
                let payload_len = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
                let body_len =
                    u64::from(u32::from_le_bytes(h[24..28].try_into().unwrap_or_default()));
                let body_at = at + HEADER_LEN + payload_len;
                if body_at + body_len > len {
                    break;
                }
                // A frame the index holds durably (lsn <= after) was flushed
                // whole before that: its lengths are trusted without reading
                // its body, which a large backlog would make slow. Except
                // the first: a frame being written over a reused segment
                // from its start may have torn what its header describes.
                let mut body = Vec::new();
                if lsn > after || newest == 0 {
                    body = vec![0u8; body_len as usize];
                    if file.read_exact_at(&mut body, body_at).is_err()
                        || frame_digest(&h[0..32], &body)[..] != h[32..48]
                    {
                        break;
                    }
                }
                newest = lsn;
                if lsn > after && h[5] & FLAG_VOID == 0 {
                    out.push(Frame {
                        lsn,
                        loc: Location {
                            seg: no,
                            at: at + HEADER_LEN,
                        },
                        payload_len,
                        body,
                    });
                }
                at = align(body_at + body_len);
            }
            max_lsn.insert(no, (newest, at));
        }
        let mut s = self.state();
        for (no, (lsn, end)) in max_lsn {
            if let Some(seg) = s.segs.get_mut(&no) {
                seg.max_lsn = lsn;
                seg.found_end = end;
            }
        }
        Ok(out)
    }

    /// A reader of `len` bytes at `loc`.
    pub fn reader(&self, loc: Location, len: u64) -> Result<SegReader, SpoolError> {
        let path = self.path(loc.seg);
        let file = match self.state().segs.get(&loc.seg) {
            Some(s) => Arc::clone(&s.file),
            None => {
                return Err(SpoolError::Integrity {
                    path,
                    detail: "the payload's segment file is missing".into(),
                })
            }
        };
        Ok(SegReader {
            file,
            pos: loc.at,
            end: loc.at + len,
        })
    }

    /// After start-up: `live` counts the records of each segment; every
    /// segment with none becomes free (everything in it is durable by then).
    /// Each segment is flushed once, so that the frames found in it (which
    /// may have been read from the page cache after a crash of the process
    /// alone) are on the disk with their block map: they are its
    /// written-through mark.
    pub fn settle(&self, live: &BTreeMap<u32, (u64, u64)>) {
        let mut s = self.state();
        for (no, seg) in s.segs.iter_mut() {
            seg.through = 0;
            match seg.file.sync_data() {
                Ok(()) => seg.through = seg.found_end,
                Err(e) => tracing::warn!(
                    segment = %self.dir.join(format!("{no:08x}.seg")).display(),
                    "spool segment not flushed at start; its frames get flushes of their own: {e}"
                ),
            }
            (seg.live, seg.live_bytes) = live.get(no).copied().unwrap_or((0, 0));
            seg.max_lsn = 0;
            seg.busy = 0;
            seg.status = if seg.live == 0 {
                Status::Free
            } else {
                Status::Closed
            };
        }
        s.settled = true;
        self.trim(&mut s);
    }

    /// A segment to append a new frame to: an open one with room (for a
    /// frame of `need` bytes, or any frame when `None`), else a free one,
    /// else a new one if `may_grow` allows `size` more bytes.
    pub fn take(
        &self,
        need: Option<u64>,
        may_grow: impl FnOnce(u64) -> Result<(), SpoolError>,
    ) -> Result<Writer, SpoolError> {
        {
            let mut s = self.state();
            let size = self.size;
            let room = need.unwrap_or(min_room(size));
            let pick = s
                .segs
                .iter()
                .filter(|(_, g)| {
                    (g.status == Status::Open && size - g.pos >= room) || g.status == Status::Free
                })
                // Open segments before free ones, then the lowest number.
                .min_by_key(|(n, g)| (g.status == Status::Free, **n))
                .map(|(n, _)| *n);
            if let Some((no, seg)) = pick.and_then(|no| Some((no, s.segs.get_mut(&no)?))) {
                if seg.status == Status::Free {
                    seg.pos = 0;
                }
                seg.status = Status::Writing;
                seg.busy += 1;
                return Ok(Writer {
                    seg: no,
                    file: Arc::clone(&seg.file),
                    start: seg.pos,
                    written: 0,
                    size,
                    through: seg.through,
                    state: Arc::clone(&self.state),
                    flusher: Arc::clone(&self.flusher),
                    early: self.early.clone(),
                    started: seg.pos,
                });
            }
        }
        may_grow(self.size)?;
        let no = {
            let mut s = self.state();
            let no = s.next_no;
            s.next_no += 1;
            no
        };
        let path = self.path(no);
        let file = make_segment(&path, self.size).inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })?;
        crate::sync_dir(&self.dir)?;
        let file = Arc::new(file);
        self.state().segs.insert(
            no,
            Seg {
                file: Arc::clone(&file),
                status: Status::Writing,
                pos: 0,
                live: 0,
                live_bytes: 0,
                max_lsn: 0,
                busy: 1,
                through: 0,
                found_end: 0,
            },
        );
        Ok(Writer {
            seg: no,
            file,
            start: 0,
            written: 0,
            size: self.size,
            through: 0,
            state: Arc::clone(&self.state),
            flusher: Arc::clone(&self.flusher),
            early: self.early.clone(),
            started: 0,
        })
    }

    /// A frame with `lsn` is being written to `seg`.
    pub fn note_lsn(&self, seg: u32, lsn: u64) {
        if let Some(g) = self.state().segs.get_mut(&seg) {
            g.max_lsn = g.max_lsn.max(lsn);
        }
    }

    /// Gives a writer's segment back; new frames start at `next` (its own
    /// start if it wrote no frame).
    pub fn put_back(&self, seg: u32, next: u64) {
        let mut s = self.state();
        if let Some(g) = s.segs.get_mut(&seg) {
            g.pos = next;
            g.status = if self.size.saturating_sub(next) >= min_room(self.size) {
                Status::Open
            } else {
                Status::Closed
            };
        }
    }

    /// Gives back a writer's segment that could not take its frame: no new
    /// frame starts in it (what is left is less than an instance).
    pub fn put_back_full(&self, seg: u32) {
        if let Some(g) = self.state().segs.get_mut(&seg) {
            g.status = Status::Closed;
        }
    }

    /// A record holding a payload in `seg` is durably gone.
    pub fn release(&self, seg: u32, bytes: u64) {
        if let Some(g) = self.state().segs.get_mut(&seg) {
            g.live = g.live.saturating_sub(1);
            g.live_bytes = g.live_bytes.saturating_sub(bytes);
        }
    }

    /// After a durable index commit covering every frame up to `durable`:
    /// segments with no live payload, no frame being written and no newer
    /// frame are free again, and beyond [`KEEP_FREE`] deleted. Returns the
    /// bytes deleted. Nothing before [`Segments::settle`].
    pub fn reclaim(&self, durable: u64) -> u64 {
        let mut s = self.state();
        if !s.settled {
            return 0;
        }
        for g in s.segs.values_mut() {
            if g.live == 0
                && g.busy == 0
                && g.max_lsn <= durable
                && matches!(g.status, Status::Open | Status::Closed)
            {
                g.status = Status::Free;
                g.pos = 0;
            }
        }
        self.trim(&mut s)
    }

    fn trim(&self, s: &mut State) -> u64 {
        let free: Vec<u32> = s
            .segs
            .iter()
            .filter(|(_, g)| g.status == Status::Free)
            .map(|(n, _)| *n)
            .collect();
        let mut gone = 0;
        // Keep the lowest numbers (they are used first).
        for no in free.into_iter().skip(KEEP_FREE) {
            let path = self.path(no);
            match fs::remove_file(&path) {
                Ok(()) => {
                    s.segs.remove(&no);
                    gone += self.size;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "cannot delete an emptied segment: {e}")
                }
            }
        }
        gone
    }
}

/// A new segment: its blocks allocated (`fallocate`) and flushed, so later
/// writes to it change no file size and no block map; they only turn
/// allocated blocks into written ones the first time round (a journal entry
/// then), and are pure overwrites once the segment is used again.
fn make_segment(path: &Path, size: u64) -> Result<File, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64)
        .map_err(|e| io(path)(std::io::Error::from(e)))?;
    file.sync_all().map_err(io(path))?;
    Ok(file)
}

/// Reads a payload from its segment.
#[derive(Debug)]
pub(crate) struct SegReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for SegReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the segment ends before the payload",
            ));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// Writes the dirty pages of `len` bytes at `at` to the device and waits
/// until those writes completed, without a cache flush
/// (`sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`): the first half of
/// a shared flush.
fn write_out(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    sync_file_range(
        file,
        at,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

/// nix has no wrapper for `sync_file_range`; this is the spool's one call
/// into libc.
#[allow(unsafe_code)]
fn sync_file_range(
    file: &File,
    at: u64,
    len: u64,
    flags: std::os::raw::c_uint,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (Ok(at), Ok(len)) = (libc::off64_t::try_from(at), libc::off64_t::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: sync_file_range reads no memory of ours; `file` keeps the
    // descriptor open for the duration of the call.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), at, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Group commit: device cache flushes shared by frames written out
/// concurrently. Every flush of a spool file is numbered when it starts; a
/// frame whose writes completed before flush `n` started is durable once a
/// flush numbered `n` or later completes without error.
#[derive(Debug, Default)]
pub(crate) struct Flusher {
    state: Mutex<FlushState>,
    done: Condvar,
    /// `fdatasync` calls made (own and shared).
    flushes: std::sync::atomic::AtomicU64,
    /// Frames made durable by a flush another frame started.
    joined: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct FlushState {
    /// Flushes started.
    started: u64,
    /// The highest numbered flush that completed without error.
    ok: u64,
    /// A shared flush is running.
    leading: bool,
    /// Frames waiting for a flush (tests).
    #[cfg(test)]
    waiting: usize,
}

impl Flusher {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flush(&self, file: &File, n: u64) -> std::io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = file.sync_data();
        if r.is_ok() {
            let mut s = self.lock();
            s.ok = s.ok.max(n);
        }
        self.done.notify_all();
        r
    }

    /// `file`'s own `fdatasync` (its frame may change metadata); it serves
    /// the frames written out before it too.
    pub fn own(&self, file: &File) -> std::io::Result<()> {
        let n = {
            let mut s = self.lock();
            s.started += 1;
            s.started
        };
        self.flush(file, n)
    }

    /// For a frame in `file` already written out: returns once a flush
    /// that started after now completed, starting one (of `file`) if none
    /// is running. A failed flush does not count; its waiters try again.
    pub fn join(&self, file: &File) -> std::io::Result<()> {
        let mut s = self.lock();
        let need = s.started + 1;
        loop {
            if s.ok >= need {
                self.joined
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
            if !s.leading {
                s.leading = true;
                s.started += 1;
                let n = s.started;
                drop(s);
                let r = self.flush(file, n);
                self.lock().leading = false;
                self.done.notify_all();
                return r;
            }
            #[cfg(test)]
            {
                s.waiting += 1;
            }
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
            #[cfg(test)]
            {
                s.waiting -= 1;
            }
        }
    }

    /// (flushes made, frames that shared another's flush).
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.flushes.load(Relaxed), self.joined.load(Relaxed))
    }
}

/// Orders the index updates of frames flushed concurrently: each waits for
/// every lower lsn to be applied (or given up), so the index applies frames
/// in lsn order, which is the order a restart replays them in.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    state: Mutex<SeqState>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct SeqState {
    /// The next lsn to hand out.
    next_alloc: u64,
    /// The next lsn whose turn it is.
    next_turn: u64,
    /// Given up before their turn came.
    skipped: std::collections::BTreeSet<u64>,
}

impl Sequencer {
    /// Starts numbering after `last`.
    pub fn start_after(&self, last: u64) {
        let mut s = self.lock();
        s.next_alloc = last + 1;
        s.next_turn = last + 1;
        s.skipped.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut s = self.lock();
        let lsn = s.next_alloc;
        s.next_alloc += 1;
        Ticket {
            seq: Arc::clone(self),
            lsn,
            done: false,
        }
    }

    fn advance(s: &mut SeqState) {
        while s.skipped.remove(&s.next_turn) {
            s.next_turn += 1;
        }
    }
}

/// One lsn: wait for its turn, apply, and say so (dropping it unapplied
/// gives its turn up, so nobody waits for it).
#[derive(Debug)]
pub(crate) struct Ticket {
    seq: Arc<Sequencer>,
    pub lsn: u64,
    done: bool,
}

impl Ticket {
    /// Blocks until every lower lsn is applied or given up.
    pub fn wait_turn(&self) {
        let mut s = self.seq.lock();
        loop {
            Sequencer::advance(&mut s);
            if s.next_turn >= self.lsn {
                return;
            }
            s = self.seq.turn.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// This lsn is applied (or refused): the next may go.
    pub fn finish(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let mut s = self.seq.lock();
        if s.next_turn == self.lsn {
            s.next_turn += 1;
        } else {
            s.skipped.insert(self.lsn);
        }
        Sequencer::advance(&mut s);
        drop(s);
        self.seq.turn.notify_all();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_again_and_a_torn_one_ends_the_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = Segments::open(dir.path(), 1 << 20).expect("open");
        let mut w = segs.take(None, |_| Ok(())).expect("take");
        w.append(b"payload one").expect("append");
        let next = w.seal_frame(7, b"body one").expect("seal");
        assert_eq!(next, ALIGN);
        segs.put_back(w.seg, next);
        let mut second = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!((second.seg, second.start), (w.seg, next));
        second.append(b"payload two").expect("append");
        second.seal_frame(8, b"body two").expect("seal");
        let mut frames = segs.scan(0).expect("scan");
        frames.sort_by_key(|f| f.lsn);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].body, b"body two");
        assert_eq!(frames[1].loc.at, ALIGN + HEADER_LEN);
        assert_eq!(segs.scan(7).expect("scan").len(), 1, "only newer frames");

        // One byte of the first body changed: its digest fails, and the
        // scan of that segment stops there.
        w.file.write_all_at(b"X", HEADER_LEN + 11).expect("tear");
        assert!(segs.scan(0).expect("scan").is_empty());
    }

    #[test]
    fn lsns_take_their_turns_in_order_and_a_dropped_one_is_skipped() {
        let seq = Arc::new(Sequencer::default());
        seq.start_after(10);
        let a = seq.ticket();
        let b = seq.ticket();
        let c = seq.ticket();
        assert_eq!((a.lsn, b.lsn, c.lsn), (11, 12, 13));
        let order = Arc::new(Mutex::new(Vec::new()));
        let t = {
            let order = Arc::clone(&order);
            std::thread::spawn(move || {
                c.wait_turn();
                order.lock().expect("lock").push(13);
                c.finish();
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            order.lock().expect("lock").is_empty(),
            "13 waited for 11 and 12"
        );
        drop(b); // given up
        a.wait_turn();
        order.lock().expect("lock").push(11);
        a.finish();
        t.join().expect("join");
        assert_eq!(*order.lock().expect("lock"), vec![11, 13]);
    }

    #[test]
    fn emptied_segments_are_reused_after_the_commit_that_made_them_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = Segments::open(dir.path(), 1 << 20).expect("open");
        segs.settle(&BTreeMap::new());
        let mut w = segs.take(None, |_| Ok(())).expect("take");
        w.append(&[1u8; 300 * 1024]).expect("append");
        segs.note_lsn(w.seg, 5);
        let next = w.seal_frame(5, b"b").expect("seal");
        segs.put_back(w.seg, next);
        w.hold(10);
        let (seg, start) = (w.seg, w.start);
        drop(w);
        // Open with room: the next writer appends after the frame.
        let w2 = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!((w2.seg, w2.start), (seg, next));
        segs.put_back(w2.seg, w2.start);
        drop(w2);
        segs.release(seg, 10);
        segs.reclaim(4);
        let w3 = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!(w3.start, next, "lsn 5 not durable yet: not reused");
        segs.put_back(w3.seg, w3.start);
        segs.reclaim(5);
        let w4 = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!(
            (w4.seg, w4.start),
            (seg, next),
            "a writer was still in it: not reused"
        );
        segs.put_back(w4.seg, w4.start);
        drop((w3, w4));
        segs.reclaim(5);
        let w5 = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!(
            (w5.seg, w5.start),
            (seg, start),
            "used again from its start"
        );
    }

    #[test]
    fn a_segment_used_again_shares_flushes_and_its_first_pass_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = Segments::open(dir.path(), 1 << 20).expect("open");
        segs.settle(&BTreeMap::new());
        // First pass: each frame turns reserved blocks into written ones,
        // so it is flushed by its own fdatasync and moves the mark.
        let mut ends = Vec::new();
        for lsn in 1..=3 {
            let mut w = segs.take(None, |_| Ok(())).expect("take");
            assert_eq!(w.through, ends.last().copied().unwrap_or(0));
            w.append(&[7u8; 5000]).expect("append");
            let next = w.seal_frame(lsn, b"body").expect("seal");
            segs.put_back(w.seg, next);
            ends.push(next);
        }
        assert_eq!(segs.flush_counts(), (3, 0), "three own flushes");
        // Used again from its start (as after a reclaim): every frame lies
        // below the mark and takes the shared flush (alone, it leads it).
        {
            let mut s = segs.state();
            let g = s.segs.values_mut().next().expect("segment");
            assert_eq!(g.through, ends[2]);
            g.pos = 0;
            g.status = Status::Open;
        }
        let mut w = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!((w.start, w.through), (0, ends[2]));
        w.append(&[8u8; 5000]).expect("append");
        assert_eq!(w.seal_frame(4, b"body").expect("seal"), ends[0]);
        assert_eq!(segs.flush_counts(), (4, 0));
        // A frame that crosses the mark is flushed as its own.
        segs.put_back(w.seg, ends[2] - ALIGN);
        let mut w = segs.take(None, |_| Ok(())).expect("take");
        w.append(&[9u8; 9000]).expect("append");
        let end = w.seal_frame(5, b"body").expect("seal");
        assert!(end > ends[2]);
        let s = segs.state();
        assert_eq!(s.segs.values().next().expect("segment").through, end);
    }

    #[test]
    fn the_mark_found_at_start_is_where_the_frames_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let end = {
            let segs = Segments::open(dir.path(), 1 << 20).expect("open");
            segs.settle(&BTreeMap::new());
            let mut w = segs.take(None, |_| Ok(())).expect("take");
            w.append(&[1u8; 10_000]).expect("append");
            w.seal_frame(1, b"body").expect("seal")
        };
        let segs = Segments::open(dir.path(), 1 << 20).expect("open");
        assert_eq!(segs.scan(0).expect("scan").len(), 1);
        segs.settle(&BTreeMap::new());
        let w = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!((w.start, w.through), (0, end));
    }

    #[test]
    fn a_flush_shared_must_have_started_after_the_frame_was_written_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Arc::new(make_segment(&dir.path().join("a.seg"), 1 << 16).expect("segment"));
        for later_flush_started in [false, true] {
            let flusher = Arc::new(Flusher::default());
            {
                // Flush 5 is running: it began before the frame below was
                // written out, so it does not cover it.
                let mut s = flusher.lock();
                (s.started, s.ok, s.leading) = (5, 4, true);
            }
            let joiner = {
                let (flusher, file) = (Arc::clone(&flusher), Arc::clone(&file));
                std::thread::spawn(move || flusher.join(&file))
            };
            while flusher.lock().waiting == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            {
                let mut s = flusher.lock();
                if later_flush_started {
                    // ...but flush 6, begun after, completed: it does.
                    s.started = 6;
                    s.ok = 6;
                } else {
                    s.ok = 5;
                    s.leading = false;
                }
            }
            flusher.done.notify_all();
            joiner.join().expect("thread").expect("join");
            let expect = if later_flush_started { (0, 1) } else { (1, 0) };
            assert_eq!(
                flusher.counts(),
                expect,
                "later flush: {later_flush_started}"
            );
        }
    }

    #[test]
    fn concurrent_frames_below_their_marks_share_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = Arc::new(Segments::open(dir.path(), 1 << 20).expect("open"));
        segs.settle(&BTreeMap::new());
        const WRITERS: usize = 8;
        const ROUNDS: u64 = 20;
        // A segment per writer, written through once.
        let mut writers: Vec<Writer> = (0..WRITERS)
            .map(|_| segs.take(None, |_| Ok(())).expect("take"))
            .collect();
        for (i, w) in writers.iter_mut().enumerate() {
            w.append(&vec![1u8; 600 * 1024]).expect("append");
            w.seal_frame(i as u64 + 1, b"b").expect("seal");
        }
        let seg_nos: Vec<u32> = writers.iter().map(|w| w.seg).collect();
        drop(writers);
        {
            let mut s = segs.state();
            for g in s.segs.values_mut() {
                assert!(g.through > 600 * 1024);
                (g.pos, g.status) = (0, Status::Closed);
            }
        }
        let before = segs.flush_counts();
        let barrier = Arc::new(std::sync::Barrier::new(WRITERS));
        let threads: Vec<_> = seg_nos
            .into_iter()
            .enumerate()
            .map(|(i, no)| {
                let (segs, barrier) = (Arc::clone(&segs), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    for r in 0..ROUNDS {
                        // A writer on this thread's own segment.
                        let mut w = {
                            let s = segs.state();
                            let g = s.segs.get(&no).expect("segment");
                            Writer {
                                seg: no,
                                file: Arc::clone(&g.file),
                                start: (r % 64) * 8192,
                                written: 0,
                                size: segs.size,
                                through: g.through,
                                state: Arc::clone(&segs.state),
                                flusher: Arc::clone(&segs.flusher),
                                early: segs.early.clone(),
                                started: (r % 64) * 8192,
                            }
                        };
                        w.append(&[r as u8; 4000]).expect("append");
                        barrier.wait();
                        w.seal_frame(100 + i as u64 * ROUNDS + r, b"b")
                            .expect("seal");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let (flushes, joined) = segs.flush_counts();
        let frames = WRITERS as u64 * ROUNDS;
        assert_eq!(
            flushes - before.0 + joined - before.1,
            frames,
            "every frame flushed once: by itself or with others"
        );
        assert!(
            flushes - before.0 < frames,
            "{} flushes for {frames} frames written out together",
            flushes - before.0
        );
    }

    /// Writes a whole frame at `at` as a writer would; returns where the
    /// next one starts.
    fn frame_at(file: &File, at: u64, lsn: u64, payload: &[u8], body: &[u8]) -> u64 {
        file.write_all_at(payload, at + HEADER_LEN)
            .expect("payload");
        let body_at = at + HEADER_LEN + payload.len() as u64;
        file.write_all_at(body, body_at).expect("body");
        file.write_all_at(&header(lsn, payload.len() as u64, body), at)
            .expect("header");
        align(body_at + body.len() as u64)
    }

    fn lsns(segs: &Segments, after: u64) -> Vec<u64> {
        let mut v: Vec<u64> = segs
            .scan(after)
            .expect("scan")
            .iter()
            .map(|f| f.lsn)
            .collect();
        v.sort();
        v
    }

    /// A segment holding frames with lsns 1, 2 and 3; the offsets of the
    /// second and third.
    fn three_frames() -> (tempfile::TempDir, Segments, Writer, u64, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = Segments::open(dir.path(), 1 << 20).expect("open");
        let w = segs.take(None, |_| Ok(())).expect("take");
        let b = frame_at(&w.file, 0, 1, b"one", b"body one");
        let c = frame_at(&w.file, b, 2, b"two", b"body two");
        frame_at(&w.file, c, 3, b"three", b"body three");
        (dir, segs, w, b, c)
    }

    #[test]
    fn frames_the_index_holds_are_passed_over_without_reading_their_bodies() {
        let (_dir, segs, w, b, _) = three_frames();
        // The body of lsn 2 (applied and durable) is damaged: the frame
        // after it, not applied yet, is still found.
        w.file
            .write_all_at(b"X", b + HEADER_LEN + 3)
            .expect("damage");
        assert_eq!(lsns(&segs, 2), vec![3]);
        // Not lsn 2 itself once it must be applied again.
        assert_eq!(lsns(&segs, 1), Vec::<u64>::new());
    }

    #[test]
    fn a_frame_torn_over_a_reused_segment_hides_nothing_it_wrote() {
        // What a torn frame wrote may look like a frame: here, one carried
        // in a payload, with lsn 99 and a good digest.
        let forged = |file: &File, at: u64| {
            let mut fake = vec![0u8; (2 * ALIGN) as usize];
            let body = b"forged body";
            fake[..HEADER_LEN as usize].copy_from_slice(&header(99, 4, body));
            fake[(HEADER_LEN + 4) as usize..][..body.len()].copy_from_slice(body);
            file.write_all_at(&fake, at).expect("torn payload");
        };
        // First life of the segment: lsns 1, 2, 3.
        let (_dir, segs, w, b, _) = three_frames();

        // Reused from its start: the first new frame tore after writing its
        // payload (over the old body of lsn 1 and the old frame of lsn 2),
        // before its header. The old header at 0 fails its digest.
        w.file
            .write_all_at(&vec![7u8; (b - HEADER_LEN) as usize], HEADER_LEN)
            .expect("torn payload");
        forged(&w.file, b);
        assert_eq!(lsns(&segs, 3), Vec::<u64>::new(), "nothing was flushed");

        // Second try: lsn 10 written whole at 0, then lsn 11 torn after it,
        // over the old frame of lsn 2 (whose header still stands there).
        let (_dir, segs, w, b, c) = three_frames();
        assert_eq!(frame_at(&w.file, 0, 10, b"ten", b"body ten"), b);
        w.file
            .write_all_at(&vec![7u8; (c - b - HEADER_LEN) as usize], b + HEADER_LEN)
            .expect("torn payload");
        forged(&w.file, c);
        assert_eq!(
            lsns(&segs, 10),
            Vec::<u64>::new(),
            "the old frame of lsn 2 ends the segment's log"
        );
        assert_eq!(lsns(&segs, 9), vec![10]);
    }

    #[test]
    fn a_void_frame_is_passed_over_and_the_frames_after_it_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segs = Segments::open(dir.path(), 1 << 20).expect("open");
        let mut first = segs.take(None, |_| Ok(())).expect("take");
        first.append(b"refused").expect("append");
        let next = first.seal_frame(1, b"body one").expect("seal");
        segs.put_back(first.seg, next);
        // Another association appends while the first waits for its index
        // update, which then fails.
        let mut second = segs.take(None, |_| Ok(())).expect("take");
        assert_eq!(second.start, next);
        second.append(b"accepted").expect("append");
        second.seal_frame(2, b"body two").expect("seal");
        first.void_frame(1, b"body one");
        assert_eq!(lsns(&segs, 0), vec![2]);
    }
}
