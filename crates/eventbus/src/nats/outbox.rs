//! The on-disk outbox: every event bound for NATS is appended here first,
//! and leaves once JetStream has acknowledged it. While the broker is
//! away it accumulates, up to a byte cap.
//!
//! Layout of the outbox directory:
//!
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: append-only segment files, named by the
//!   index of their first record (20 digits, so names sort by index). A
//!   record is `len u32 LE | crc32 u32 LE | id_len u16 LE | subject_len
//!   u16 LE | id | subject | payload`, `len` counting everything after
//!   the crc, the crc (CRC-32, IEEE) covering the same bytes.
//! - `acked`: the index of the first record not yet acknowledged, as
//!   decimal text; replaced atomically (written to `acked.tmp`, fsynced,
//!   renamed).
//!
//! Durability: a record is written with one `write` and not fsynced on
//! its own; the segment is fdatasynced when the forwarder calls
//! [`Outbox::sync`] (once a second while there is something new) and
//! when a segment is sealed. A crashed process loses nothing (the page
//! cache survives it); a crashed machine loses at most the last second's
//! records. At open, each segment is read back and cut at the first torn
//! or corrupt record, so a crash leaves every record either whole or
//! absent. An `acked` older than the truth (a crash before it was
//! replaced) only makes records be sent again, which JetStream drops as
//! duplicates by their message id.
//!
//! Bound: the segments' total size stays within `max_bytes`; an append
//! that would pass it is refused (the caller counts the loss). Sealed
//! segments are deleted once every record in them is acknowledged.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Bytes of a record's fixed header (`len`, `crc`, `id_len`,
/// `subject_len`).
const HEADER: usize = 12;

/// The largest record accepted, in bytes (an event is at most 1 MiB).
pub const MAX_RECORD_BYTES: usize = 4 << 20;

/// The largest segment file, in bytes (smaller for a small outbox: a
/// quarter of its cap, so acknowledged records still on disk take at most
/// that share).
pub const MAX_SEGMENT_BYTES: u64 = 8 << 20;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its index: records are numbered from 0 for the life of the outbox.
    pub index: u64,
    /// Its NATS message id.
    pub id: String,
    /// Its subject.
    pub subject: String,
    /// Its payload.
    pub payload: Bytes,
}

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A file operation failed.
    #[error("outbox {path}: {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A record is larger than [`MAX_RECORD_BYTES`] or its id or subject
    /// longer than 65535 bytes.
    #[error("record of {0} bytes is too large for the outbox")]
    TooLarge(usize),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OutboxError + 'a {
    move |source| OutboxError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    first: u64,
    count: u64,
    len: u64,
    path: PathBuf,
}

#[derive(Debug)]
struct Reader {
    /// The index of the next record it returns.
    next: u64,
    /// The segment it reads (its first index) and the file.
    segment: u64,
    file: BufReader<File>,
}

/// An open outbox directory. Not shared: one forwarder owns it.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    writer: File,
    next_index: u64,
    acked: u64,
    acked_on_disk: u64,
    bytes: u64,
    unsynced: bool,
    reader: Option<Reader>,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// Encodes one record.
fn encode(id: &str, subject: &str, payload: &[u8]) -> Result<Vec<u8>, OutboxError> {
    let body = 4 + id.len() + subject.len() + payload.len();
    if HEADER + body - 4 > MAX_RECORD_BYTES || id.len() > 0xffff || subject.len() > 0xffff {
        return Err(OutboxError::TooLarge(body + 8));
    }
    let mut out = Vec::with_capacity(8 + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(&(subject.len() as u16).to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(subject.as_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads one record from `r`: `Ok(None)` at a clean end, or at a torn or
/// corrupt record (`torn` tells which).
fn read_record(r: &mut impl Read) -> io::Result<Option<(String, String, Bytes, u64)>> {
    let mut head = [0u8; 8];
    match read_full(r, &mut head)? {
        0 => return Ok(None),
        8 => {}
        _ => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "torn header")),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(4..=MAX_RECORD_BYTES).contains(&len) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad length"));
    }
    let mut body = vec![0u8; len];
    if read_full(r, &mut body)? != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "torn record"));
    }
    if crc32fast::hash(&body) != crc {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad checksum"));
    }
    let id_len = u16::from_le_bytes([body[0], body[1]]) as usize;
    let subject_len = u16::from_le_bytes([body[2], body[3]]) as usize;
    if 4 + id_len + subject_len > len {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad lengths"));
    }
    let text = |b: &[u8]| {
        String::from_utf8(b.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "utf-8"))
    };
    let id = text(&body[4..4 + id_len])?;
    let subject = text(&body[4 + id_len..4 + id_len + subject_len])?;
    let payload = Bytes::from(body).slice(4 + id_len + subject_len..);
    Ok(Some((id, subject, payload, (8 + len) as u64)))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`, bounded to `max_bytes`,
    /// recovering what a previous run left: torn tails are cut, and
    /// reading starts at the first unacknowledged record.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Outbox, OutboxError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let acked_path = dir.join("acked");
        let acked_file = match fs::read_to_string(&acked_path) {
            Ok(text) => text.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read", &acked_path)(e)),
        };
        let mut firsts: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".seg")?;
                (stem.len() == 20).then(|| stem.parse().ok())?
            })
            .collect();
        firsts.sort_unstable();
        let mut segments = VecDeque::new();
        let mut broken = false;
        for first in firsts {
            let path = segment_path(dir, first);
            let expected = segments.back().map(|s: &Segment| s.first + s.count);
            if broken || expected.is_some_and(|e| e != first) {
                // After a cut, or not continuing the previous segment:
                // nothing here can be trusted to follow in order.
                tracing::warn!(path = %path.display(), "outbox: dropping a segment after a damaged one");
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                continue;
            }
            let file = File::open(&path).map_err(io_err("open", &path))?;
            let mut r = BufReader::new(file);
            let (mut count, mut len) = (0u64, 0u64);
            loop {
                match read_record(&mut r) {
                    Ok(Some((_, _, _, n))) => {
                        count += 1;
                        len += n;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), offset = len, error = %e, "outbox: cutting a torn or damaged record");
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                f.set_len(len).map_err(io_err("truncate", &path))?;
                f.sync_data().map_err(io_err("sync", &path))?;
            }
            segments.push_back(Segment {
                first,
                count,
                len,
                path,
            });
        }
        let next_index = segments
            .back()
            .map_or(acked_file.unwrap_or(0), |s| s.first + s.count);
        let oldest = segments.front().map_or(next_index, |s| s.first);
        let acked = acked_file.unwrap_or(oldest).clamp(oldest, next_index);
        if segments.is_empty() {
            let path = segment_path(dir, next_index);
            segments.push_back(Segment {
                first: next_index,
                count: 0,
                len: 0,
                path,
            });
        }
        let Some(last) = segments.back() else {
            unreachable!("one segment at least")
        };
        let writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&last.path)
            .map_err(io_err("open", &last.path))?;
        let bytes = segments.iter().map(|s| s.len).sum();
        let segment_bytes = (max_bytes / 4).clamp(64 * 1024, MAX_SEGMENT_BYTES);
        let mut outbox = Outbox {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            segments,
            writer,
            next_index,
            acked,
            acked_on_disk: acked_file.unwrap_or(u64::MAX),
            bytes,
            unsynced: false,
            reader: None,
        };
        outbox.rewind()?;
        outbox.ack(acked)?;
        Ok(outbox)
    }

    /// Appends a record unless that would pass the byte cap (`Ok(false)`:
    /// nothing was written). `force` appends even past the cap (a loss
    /// marker: small, and it must not be lost itself).
    pub fn append(
        &mut self,
        id: &str,
        subject: &str,
        payload: &[u8],
        force: bool,
    ) -> Result<bool, OutboxError> {
        let record = encode(id, subject, payload)?;
        let n = record.len() as u64;
        if !force && self.bytes + n > self.max_bytes {
            return Ok(false);
        }
        let needs_new = self
            .segments
            .back()
            .is_some_and(|s| s.count > 0 && s.len + n > self.segment_bytes);
        if needs_new {
            self.seal()?;
        }
        let Some(last) = self.segments.back_mut() else {
            unreachable!("one segment at least")
        };
        self.writer
            .write_all(&record)
            .map_err(io_err("append", &last.path))?;
        last.count += 1;
        last.len += n;
        self.bytes += n;
        self.next_index += 1;
        self.unsynced = true;
        Ok(true)
    }

    /// Syncs the current segment and starts a new one.
    fn seal(&mut self) -> Result<(), OutboxError> {
        let path = segment_path(&self.dir, self.next_index);
        if let Some(last) = self.segments.back() {
            self.writer
                .sync_data()
                .map_err(io_err("sync", &last.path))?;
        }
        self.writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        self.segments.push_back(Segment {
            first: self.next_index,
            count: 0,
            len: 0,
            path,
        });
        self.unsynced = false;
        Ok(())
    }

    /// The next record not yet read, if any.
    pub fn next_record(&mut self) -> Result<Option<Record>, OutboxError> {
        loop {
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            if reader.next >= self.next_index {
                return Ok(None);
            }
            let segment = self.segments.iter().find(|s| s.first == reader.segment);
            let in_segment = segment.is_some_and(|s| reader.next < s.first + s.count);
            if !in_segment {
                // This segment is read to its end: on to the next one.
                let Some(next) = self.segments.iter().find(|s| s.first == reader.next) else {
                    return Ok(None);
                };
                let file = File::open(&next.path).map_err(io_err("open", &next.path))?;
                reader.segment = next.first;
                reader.file = BufReader::new(file);
                continue;
            }
            let path = segment.map(|s| s.path.clone()).unwrap_or_default();
            let read = read_record(&mut reader.file).map_err(io_err("read", &path))?;
            let Some((id, subject, payload, _)) = read else {
                return Err(io_err("read", &path)(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "record missing",
                )));
            };
            let index = reader.next;
            reader.next += 1;
            return Ok(Some(Record {
                index,
                id,
                subject,
                payload,
            }));
        }
    }

    /// Makes reading start again at the first unacknowledged record.
    pub fn rewind(&mut self) -> Result<(), OutboxError> {
        let Some(segment) = self
            .segments
            .iter()
            .find(|s| self.acked < s.first + s.count.max(1))
            .or(self.segments.back())
        else {
            return Ok(());
        };
        let mut file =
            BufReader::new(File::open(&segment.path).map_err(io_err("open", &segment.path))?);
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("seek", &segment.path))?;
        let mut next = segment.first;
        while next < self.acked {
            read_record(&mut file).map_err(io_err("read", &segment.path))?;
            next += 1;
        }
        self.reader = Some(Reader {
            next,
            segment: segment.first,
            file,
        });
        Ok(())
    }

    /// Records every record below `index` as acknowledged, deleting the
    /// sealed segments that held only such records.
    pub fn ack(&mut self, index: u64) -> Result<(), OutboxError> {
        self.acked = self.acked.max(index.min(self.next_index));
        while self.segments.len() > 1 {
            let Some(first) = self.segments.front() else {
                break;
            };
            if first.first + first.count > self.acked {
                break;
            }
            fs::remove_file(&first.path).map_err(io_err("remove", &first.path))?;
            self.bytes -= first.len;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Makes what was appended durable and records the acknowledged index
    /// (atomically: a crash leaves the old value or the new one).
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if self.unsynced {
            let path = self
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            self.writer.sync_data().map_err(io_err("sync", &path))?;
            self.unsynced = false;
        }
        if self.acked_on_disk != self.acked {
            let tmp = self.dir.join("acked.tmp");
            let mut f = File::create(&tmp).map_err(io_err("write", &tmp))?;
            f.write_all(format!("{}\n", self.acked).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_err("write", &tmp))?;
            let path = self.dir.join("acked");
            fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
            self.acked_on_disk = self.acked;
        }
        Ok(())
    }

    /// Whether records of `sizes` bytes ([`Outbox::record_len`]) would
    /// all fit under the cap now.
    pub fn fits(&self, sizes: &[u64]) -> bool {
        self.bytes + sizes.iter().sum::<u64>() <= self.max_bytes
    }

    /// The bytes a record takes in a segment.
    pub fn record_len(id: &str, subject: &str, payload: &[u8]) -> u64 {
        (HEADER + id.len() + subject.len() + payload.len()) as u64
    }

    /// Records not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.next_index - self.acked
    }

    /// Bytes the segments take on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The index the next appended record gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(o: &mut Outbox) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        while let Some(r) = o.next_record().unwrap() {
            out.push((r.index, String::from_utf8(r.payload.to_vec()).unwrap()));
        }
        out
    }

    fn put(o: &mut Outbox, i: u64) -> bool {
        o.append(&format!("id{i}"), "s.x", format!("p{i}").as_bytes(), false)
            .unwrap()
    }

    #[test]
    fn test_append_read_ack_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            assert!(put(&mut o, i));
        }
        let got = drain(&mut o);
        assert_eq!(got.len(), 5);
        assert_eq!(got[4], (4, "p4".into()));
        o.ack(3).unwrap();
        o.sync().unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(o.pending(), 2);
        assert_eq!(drain(&mut o), [(3, "p3".into()), (4, "p4".into())]);
        assert!(put(&mut o, 5));
        assert_eq!(drain(&mut o), [(5, "p5".into())]);
        // Go back: the unacknowledged ones again, in order.
        o.rewind().unwrap();
        assert_eq!(
            drain(&mut o).iter().map(|r| r.0).collect::<Vec<_>>(),
            [3, 4, 5]
        );
    }

    #[test]
    fn test_cap_refuses_and_acks_free_sealed_segments() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB segments (the floor), 256 KiB in all.
        let mut o = Outbox::open(dir.path(), 256 * 1024).unwrap();
        let payload = vec![b'x'; 1000];
        let mut n = 0u64;
        while o.append(&format!("{n}"), "s", &payload, false).unwrap() {
            n += 1;
        }
        assert!(o.bytes() <= 256 * 1024);
        assert!(n > 200, "{n}");
        // A loss marker still goes in.
        assert!(o.append("lost", "s", b"m", true).unwrap());
        let segments = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".seg")
                })
                .count()
        };
        let before = segments();
        assert!(before >= 4, "{before}");
        o.ack(n).unwrap();
        assert_eq!(segments(), 1);
        assert!(o.append("again", "s", &payload, false).unwrap());
    }

    #[test]
    fn test_torn_tail_is_cut_and_order_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        for i in 0..3 {
            assert!(put(&mut o, i));
        }
        drop(o);
        let seg = segment_path(dir.path(), 0);
        let len = fs::metadata(&seg).unwrap().len();
        // Half of a fourth record, as a crash mid-write leaves it.
        let rec = encode("id3", "s.x", b"p3").unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&rec[..rec.len() / 2]).unwrap();
        drop(f);
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        assert_eq!(o.next_index(), 3);
        assert!(put(&mut o, 3));
        assert_eq!(
            drain(&mut o)
                .iter()
                .map(|r| r.1.clone())
                .collect::<Vec<_>>(),
            ["p0", "p1", "p2", "p3"]
        );
        // A flipped byte in the middle: cut there.
        drop(o);
        let mut bytes = fs::read(&seg).unwrap();
        let second = rec.len() + 5;
        bytes[second + 10] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let mut o = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain(&mut o).len(), 1);
    }

    #[test]
    fn test_segments_chain_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 256 * 1024).unwrap();
        let payload = vec![b'y'; 2000];
        for i in 0..100 {
            assert!(o.append(&format!("{i}"), "s", &payload, false).unwrap());
        }
        o.ack(40).unwrap();
        o.sync().unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), 256 * 1024).unwrap();
        let mut want = 40;
        while let Some(r) = o.next_record().unwrap() {
            assert_eq!((r.index, r.id.clone()), (want, want.to_string()));
            want += 1;
        }
        assert_eq!(want, 100);
    }
}
