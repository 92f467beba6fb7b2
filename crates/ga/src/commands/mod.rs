//! Command implementations, one module per area. Every handler visits its
//! arguments in schema order, calls [`Args::finish`](crate::args::Args::finish),
//! then runs.

pub mod basic;
pub mod cpu;
pub mod disks;
pub mod diskstats;
pub mod exec;
pub mod file;
pub mod fsfreeze;
pub mod network;
pub mod password;
pub mod ssh;
pub mod suspend;
pub mod sysinfo;
pub mod unsupported;

/// `strerror` text of an OS error, without Rust's " (os error N)" suffix.
pub fn strerror(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => {
            let text = std::io::Error::from_raw_os_error(code).to_string();
            match text.rfind(" (os error ") {
                Some(i) => text[..i].to_owned(),
                None => text,
            }
        }
        None => err.to_string(),
    }
}

/// `error_setg_errno`: "<msg>: <strerror>".
pub fn with_errno(msg: &str, err: &std::io::Error) -> qvirt_qga::QgaError {
    qvirt_qga::QgaError::generic(format!("{msg}: {}", strerror(err)))
}

/// QERR_UNSUPPORTED.
pub fn unsupported_error() -> qvirt_qga::QgaError {
    qvirt_qga::QgaError::generic("this feature or command is not currently supported")
}
