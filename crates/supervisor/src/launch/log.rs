//! The per-domain QEMU log file: opened for append before the spawn (QEMU's
//! stdout and stderr go there), and its tail read back when QEMU fails.

use std::io::{self, SeekFrom};
use std::path::Path;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How much of QEMU's output a startup error quotes, at most.
pub const LOG_TAIL_BYTES: u64 = 2048;

/// An opened log: the file for the child's stdio, and where this run's
/// output starts.
pub(crate) struct OpenedLog {
    /// The file, for stdout (clone it for stderr).
    pub file: std::fs::File,
    /// The file length before QEMU wrote anything.
    pub start: u64,
}

/// Open (create, mode 0600) `path` for append and write a header line
/// naming the command about to run. Blocking.
pub(crate) fn open(path: &Path, header: &str) -> io::Result<OpenedLog> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(header.as_bytes())?;
    let start = file.metadata()?.len();
    Ok(OpenedLog { file, start })
}

/// The last `LOG_TAIL_BYTES` of what was written to `path` after `start`,
/// trimmed, starting at a line boundary when the cut fell mid-line.
pub(crate) async fn tail(path: &Path, start: u64) -> io::Result<String> {
    let mut file = tokio::fs::File::open(path).await?;
    let end = file.metadata().await?.len();
    let from = start.max(end.saturating_sub(LOG_TAIL_BYTES));
    file.seek(SeekFrom::Start(from)).await?;
    let mut bytes = Vec::new();
    file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes).await?;
    let text = String::from_utf8_lossy(&bytes);
    let text = if from > start {
        text.split_once('\n').map_or(&*text, |(_, rest)| rest)
    } else {
        &text
    };
    Ok(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_tail_skips_header_and_old_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("guest.log");
        tokio::fs::write(&path, "old run output\n")
            .await
            .expect("write");
        let log = open(&path, "starting: qemu\n").expect("open");
        std::io::Write::write_all(&mut &log.file, b"qemu: boom\n").expect("write");
        assert_eq!(tail(&path, log.start).await.expect("tail"), "qemu: boom");
    }

    #[tokio::test]
    async fn test_tail_of_long_output_keeps_the_end_on_a_line_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("guest.log");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("line {i}\n"));
        }
        tokio::fs::write(&path, &text).await.expect("write");
        let tail = tail(&path, 0).await.expect("tail");
        assert!(tail.ends_with("line 999"));
        assert!(tail.starts_with("line "));
        assert!(tail.len() <= 2048);
    }
}
