//! The agent's persistent state in its state directory, as qemu-ga keeps
//! it: `qga.state` (a key file holding the next file handle,
//! `[global] fd_counter=N`, starting at 1000) and the
//! `qga.state.isfrozen` marker that survives restarts.

use std::io;
use std::path::{Path, PathBuf};

/// First file handle number.
pub const FIRST_HANDLE: i64 = 1000;

/// Paths and values of the persistent state.
#[derive(Debug)]
pub struct PersistentState {
    state_file: PathBuf,
    marker: PathBuf,
    /// The next file handle to give out.
    pub fd_counter: i64,
}

impl PersistentState {
    /// Loads the state from `statedir`. When the agent is not frozen and
    /// the state file is missing it is created, as qemu-ga does.
    pub fn load(statedir: &Path) -> io::Result<Self> {
        let state_file = statedir.join("qga.state");
        let marker = statedir.join("qga.state.isfrozen");
        let frozen = marker.exists();
        let mut state = PersistentState {
            state_file,
            marker,
            fd_counter: FIRST_HANDLE,
        };
        match std::fs::read_to_string(&state.state_file) {
            Ok(text) => {
                if let Some(n) = parse_fd_counter(&text) {
                    state.fd_counter = n;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !frozen {
                    state.save()?;
                }
            }
            Err(e) => return Err(e),
        }
        Ok(state)
    }

    /// Whether the frozen marker exists.
    pub fn marker_exists(&self) -> bool {
        self.marker.exists()
    }

    /// Creates or removes the frozen marker.
    pub fn set_marker(&self, frozen: bool) -> io::Result<()> {
        if frozen {
            std::fs::write(&self.marker, b"")
        } else {
            match std::fs::remove_file(&self.marker) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }

    /// Writes `qga.state`.
    pub fn save(&self) -> io::Result<()> {
        std::fs::write(
            &self.state_file,
            format!("[global]\nfd_counter={}\n", self.fd_counter),
        )
    }

    /// Takes the next handle and persists the counter.
    pub fn next_handle(&mut self) -> io::Result<i64> {
        let handle = self.fd_counter;
        self.fd_counter += 1;
        self.save()?;
        Ok(handle)
    }
}

fn parse_fd_counter(text: &str) -> Option<i64> {
    let mut in_global = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_global = line == "[global]";
        } else if in_global
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == "fd_counter"
        {
            return v.trim().parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_counter_persists_across_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = PersistentState::load(dir.path()).expect("load");
        assert_eq!(s.next_handle().expect("handle"), 1000);
        assert_eq!(s.next_handle().expect("handle"), 1001);
        let s = PersistentState::load(dir.path()).expect("load");
        assert_eq!(s.fd_counter, 1002);
        let text = std::fs::read_to_string(dir.path().join("qga.state")).expect("read");
        assert_eq!(text, "[global]\nfd_counter=1002\n");
    }
}
