//! Event cursors: the opaque strings that name a place in the bus's
//! history (`DomainEvent.cursor`, `resume_after`).
//!
//! Form, version 1: `1.EPOCH.SEQ`, where EPOCH names the bus run (the
//! sequence space) and SEQ is the event's sequence number in it (0: the
//! start of the run, before its first event). Clients treat it as opaque;
//! the leading version lets the form change (a broker-backed bus would put
//! its stream's sequence here) while old cursors are still recognised.

/// The longest cursor accepted, in bytes. The bus issues far shorter ones
/// (an epoch of at most [`MAX_EPOCH_LEN`] bytes and a `u64`).
pub const MAX_CURSOR_LEN: usize = 128;

/// The longest epoch a cursor may carry, in bytes.
pub const MAX_EPOCH_LEN: usize = 64;

/// The version prefix of the cursors this bus issues.
const VERSION: &str = "1";

/// A parsed cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor<'a> {
    /// The bus run it belongs to.
    pub epoch: &'a str,
    /// The sequence number of the event it names (0: before the first).
    pub seq: u64,
}

/// Why a string is not a cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Longer than [`MAX_CURSOR_LEN`].
    #[error("is {len} bytes, at most {MAX_CURSOR_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Not of a form this bus issues.
    #[error("is not a cursor this event bus issued (pass back an event's `cursor` unchanged)")]
    Malformed,
}

/// The cursor of event `seq` of run `epoch`.
pub fn format(epoch: &str, seq: u64) -> String {
    format!("{VERSION}.{epoch}.{seq}")
}

/// Parses `text` as a cursor this bus could have issued (in any run).
pub fn parse(text: &str) -> Result<Cursor<'_>, CursorError> {
    if text.len() > MAX_CURSOR_LEN {
        return Err(CursorError::TooLong { len: text.len() });
    }
    let mut parts = text.splitn(3, '.');
    let (Some(VERSION), Some(epoch), Some(seq)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(CursorError::Malformed);
    };
    let epoch_ok = !epoch.is_empty()
        && epoch.len() <= MAX_EPOCH_LEN
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    // Digits only: `u64::from_str` would also take a leading `+`.
    let seq_ok = !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit());
    if !epoch_ok || !seq_ok {
        return Err(CursorError::Malformed);
    }
    let seq = seq.parse().map_err(|_| CursorError::Malformed)?;
    Ok(Cursor { epoch, seq })
}

/// Whether `epoch` can be carried in a cursor (checked once per bus run).
pub fn valid_epoch(epoch: &str) -> bool {
    parse(&format(epoch, u64::MAX)).is_ok_and(|c| c.epoch == epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_round_trip() {
        let text = format("18a2b3c4d5e6f708-1f2e", 42);
        assert_eq!(text, "1.18a2b3c4d5e6f708-1f2e.42");
        assert_eq!(
            parse(&text),
            Ok(Cursor {
                epoch: "18a2b3c4d5e6f708-1f2e",
                seq: 42
            })
        );
        assert_eq!(parse(&format("e", u64::MAX)).unwrap().seq, u64::MAX);
        assert_eq!(parse("1.e.0").unwrap().seq, 0);
        assert!(valid_epoch("18a2b3c4d5e6f708-1f2e"));
        assert!(!valid_epoch("a.b"));
        assert!(!valid_epoch(""));
    }

    #[test]
    fn test_malformed_cursors_are_refused() {
        for bad in [
            "",
            "1",
            "1.e",
            "1..5",
            "1.e.",
            "2.e.5",
            "01.e.5",
            "1.e.+5",
            "1.e.-5",
            "1.e.5.6",
            "1.e.5 ",
            "1.e f.5",
            "1.e.18446744073709551616",
            "1.é.5",
            "{}",
        ] {
            assert_eq!(parse(bad), Err(CursorError::Malformed), "{bad:?}");
        }
        let long = format!("1.{}.5", "e".repeat(MAX_EPOCH_LEN + 1));
        assert_eq!(parse(&long), Err(CursorError::Malformed));
        let huge = "1".repeat(MAX_CURSOR_LEN + 1);
        assert_eq!(
            parse(&huge),
            Err(CursorError::TooLong {
                len: MAX_CURSOR_LEN + 1
            })
        );
    }
}
