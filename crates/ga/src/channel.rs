//! Transports, as qemu-ga's `channel-posix.c`: `unix-listen` and
//! `vsock-listen` (backlog 1, one client at a time), `virtio-serial` (one permanent port; EOF, or a
//! hang-up while writing, means no host: sleep 100 ms and poll again,
//! never spin) and `isa-serial` (raw
//! 38400 baud). The JSON parser's state lives in the caller and survives
//! reconnects.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sys;

/// Read size per call (`QGA_READ_COUNT_DEFAULT`).
pub const READ_SIZE: usize = 4096;
/// Default virtio-serial port.
pub const VIRTIO_SERIAL_PATH: &str = "/dev/virtio-ports/org.qemu.guest_agent.0";
/// Default isa-serial device.
pub const ISA_SERIAL_PATH: &str = "/dev/ttyS0";

/// The transport method (`-m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A virtio-serial port (default).
    VirtioSerial,
    /// A serial port.
    IsaSerial,
    /// A unix socket the agent listens on.
    UnixListen,
    /// A vsock socket the agent listens on (`<cid>:<port>`).
    VsockListen,
}

impl Method {
    /// Parses `-m`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "virtio-serial" => Method::VirtioSerial,
            "isa-serial" => Method::IsaSerial,
            "unix-listen" => Method::UnixListen,
            "vsock-listen" => Method::VsockListen,
            _ => return None,
        })
    }

    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::VirtioSerial => "virtio-serial",
            Method::IsaSerial => "isa-serial",
            Method::UnixListen => "unix-listen",
            Method::VsockListen => "vsock-listen",
        }
    }
}

/// Failures opening a channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// unix-listen without `-p`.
    #[error("must specify a path for this channel")]
    NoPath,
    /// `-m` names no known method.
    #[error("unsupported channel method/type: {0}")]
    BadMethod(String),
    /// unix-listen could not bind its socket.
    #[error("Failed to bind socket to {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A vsock-listen path that is not `<cid>:<port>`.
    #[error("error parsing vsock address '{0}'")]
    BadVsockAddress(String),
    /// Opening or binding failed.
    #[error("error opening channel {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Something that can be read and written, one peer at a time.
pub trait Conn {
    /// Reads some bytes; `Ok(0)` means the peer went away.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all bytes. When a signal interrupts a wait, `keep_going`
    /// says whether to carry on (a frozen agent ignores stop requests) or
    /// to give up with `Interrupted`.
    fn write_all_bytes(
        &mut self,
        data: &[u8],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> io::Result<()>;
}

fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<libc::c_short> {
    crate::signals::poll_fd(fd, events, timeout_ms)
}

/// Waits until `fd` is readable (or a signal interrupts the wait).
pub fn wait_readable(fd: &impl AsRawFd) -> io::Result<()> {
    wait_fd(fd.as_raw_fd(), libc::POLLIN, -1).map(|_| ())
}

/// Sleeps 100 ms unless a stop signal arrives first.
fn idle_100ms() -> io::Result<()> {
    // A negative fd is ignored by poll: this waits on the signal pipe only.
    wait_fd(-1, 0, IDLE.as_millis() as i32).map(|_| ())
}

/// How long a virtio-serial port with no host side is left alone.
const IDLE: Duration = Duration::from_millis(100);

/// A device opened non-blocking (virtio-serial or isa-serial).
pub struct Device {
    file: File,
}

impl Device {
    /// Opens `path` O_RDWR | O_NONBLOCK; for isa-serial also sets raw
    /// 38400 baud and flushes pending input.
    pub fn open(path: &Path, serial: bool) -> Result<Self, ChannelError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| ChannelError::Open {
                path: path.to_owned(),
                source,
            })?;
        if serial {
            // qemu-ga goes on when these fail (a path that is no tty):
            // so does qvirt-ga, saying so in the log.
            if let Err(e) = sys::set_raw_38400(file.as_fd()) {
                crate::log::warning(&format!(
                    "cannot set up serial line {}: {}",
                    path.display(),
                    crate::commands::strerror(&e)
                ));
            }
            if let Err(e) = sys::flush_input(file.as_fd()) {
                crate::log::warning(&format!(
                    "cannot flush serial line {}: {}",
                    path.display(),
                    crate::commands::strerror(&e)
                ));
            }
        }
        Ok(Device { file })
    }
}

impl Conn for Device {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                // No host side: qemu-ga sleeps 100 ms and polls again. The
                // sleep is a poll on the signal pipe alone, so a stop request
                // still ends it.
                Ok(0) => idle_100ms()?,
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let rev = wait_fd(self.file.as_raw_fd(), libc::POLLIN, -1)?;
                    if rev & (libc::POLLHUP | libc::POLLERR) != 0 && rev & libc::POLLIN == 0 {
                        idle_100ms()?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_all_bytes(
        &mut self,
        data: &[u8],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let file = &mut self.file;
        write_loop(
            data,
            |d| file.write(d),
            || wait_fd(fd, libc::POLLOUT, -1),
            idle_100ms,
            keep_going,
        )
    }
}

/// The write loop of devices and sockets: write until all is written; on
/// EAGAIN wait for POLLOUT (and the signal pipe). A virtio-serial port
/// with no host side answers EAGAIN and
/// polls POLLHUP without POLLOUT at once: then idle 100 ms before trying
/// again, so the loop never spins. A signal during a wait ends the loop
/// with `Interrupted` unless `keep_going` says otherwise.
fn write_loop(
    mut data: &[u8],
    mut write: impl FnMut(&[u8]) -> io::Result<usize>,
    mut wait_writable: impl FnMut() -> io::Result<libc::c_short>,
    mut idle: impl FnMut() -> io::Result<()>,
    keep_going: &mut dyn FnMut() -> bool,
) -> io::Result<()> {
    while !data.is_empty() {
        match write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let waited = wait_writable().and_then(|rev| {
                    if rev & (libc::POLLHUP | libc::POLLERR) != 0 && rev & libc::POLLOUT == 0 {
                        idle()
                    } else {
                        Ok(())
                    }
                });
                match waited {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted && keep_going() => {}
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Conn for UnixStream {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        wait_fd(self.as_raw_fd(), libc::POLLIN, -1)?;
        self.read(buf)
    }

    fn write_all_bytes(
        &mut self,
        data: &[u8],
        keep_going: &mut dyn FnMut() -> bool,
    ) -> io::Result<()> {
        // Non-blocking sends and a wait on POLLOUT alongside the signal
        // pipe, so a stop request is seen while a client does not read.
        let sock = self.as_fd();
        write_loop(
            data,
            |d| sys::send_nonblocking(sock, d),
            || wait_fd(sock.as_raw_fd(), libc::POLLOUT, -1),
            idle_100ms,
            keep_going,
        )
    }
}

/// A listening stream socket (unix or vsock); one client at a time.
pub struct Listener {
    fd: OwnedFd,
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Listener {
    /// Accepts one client. Unix and vsock streams are both plain stream
    /// sockets, so the client is handled as a `UnixStream`.
    pub fn accept(&self) -> io::Result<UnixStream> {
        sys::accept(self.fd.as_fd()).map(UnixStream::from)
    }
}

/// Binds the unix-listen socket: removes a stale file, listens with
/// backlog 1.
pub fn bind_unix(path: &Path) -> Result<Listener, ChannelError> {
    let open_err = |source| ChannelError::Open {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(open_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ChannelError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // Listening again on the bound socket only changes the backlog.
    sys::listen(listener.as_fd(), 1).map_err(open_err)?;
    Ok(Listener {
        fd: OwnedFd::from(listener),
    })
}

/// Parses a vsock-listen address `<cid>:<port>` (both unsigned 32-bit).
pub fn parse_vsock(addr: &str) -> Option<(u32, u32)> {
    let (cid, port) = addr.split_once(':')?;
    Some((cid.parse().ok()?, port.parse().ok()?))
}

/// Binds the vsock-listen socket at `<cid>:<port>`, backlog 1.
pub fn bind_vsock(addr: &str) -> Result<Listener, ChannelError> {
    let path = PathBuf::from(addr);
    let open_err = |source| ChannelError::Open {
        path: path.clone(),
        source,
    };
    let (cid, port) = parse_vsock(addr).ok_or(ChannelError::BadVsockAddress(addr.to_owned()))?;
    let fd = sys::vsock_bound(cid, port).map_err(&open_err)?;
    sys::listen(fd.as_fd(), 1).map_err(open_err)?;
    Ok(Listener { fd })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port with no host side: every write is EAGAIN and poll says
    /// POLLHUP without POLLOUT. Each retry must idle; without the idle the
    /// loop would spin.
    #[test]
    fn test_write_loop_idles_on_hangup_without_pollout() {
        let mut attempts = 0;
        let mut idles = 0;
        let mut written = Vec::new();
        let result = write_loop(
            b"{\"return\": {}}\n",
            |d| {
                attempts += 1;
                if attempts <= 3 {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    written.extend_from_slice(&d[..1]);
                    Ok(1)
                }
            },
            || Ok(libc::POLLHUP),
            || {
                idles += 1;
                Ok(())
            },
            &mut || true,
        );
        result.expect("write");
        assert_eq!(idles, 3);
        assert_eq!(written, b"{\"return\": {}}\n");
        // POLLOUT (even with POLLHUP) retries at once; a stop request
        // during the idle ends the loop.
        let mut idles = 0;
        let mut first = true;
        write_loop(
            b"x",
            |_| {
                if std::mem::take(&mut first) {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(1)
                }
            },
            || Ok(libc::POLLOUT | libc::POLLHUP),
            || {
                idles += 1;
                Ok(())
            },
            &mut || true,
        )
        .expect("write");
        assert_eq!(idles, 0);
        let err = write_loop(
            b"x",
            |_| Err(io::ErrorKind::WouldBlock.into()),
            || Ok(libc::POLLHUP),
            || Err(io::ErrorKind::Interrupted.into()),
            &mut || false,
        )
        .expect_err("stopped");
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        // ... unless told to keep going (a frozen agent ignores stops):
        // the write is retried and completes.
        let mut tries = 0;
        write_loop(
            b"x",
            |_| {
                tries += 1;
                if tries < 3 {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(1)
                }
            },
            || Err(io::ErrorKind::Interrupted.into()),
            || Ok(()),
            &mut || true,
        )
        .expect("kept going");
        assert_eq!(tries, 3);
    }

    #[test]
    fn test_parse_vsock_table() {
        assert_eq!(parse_vsock("3:1234"), Some((3, 1234)));
        assert_eq!(parse_vsock("4294967295:5000"), Some((u32::MAX, 5000)));
        assert_eq!(parse_vsock("3"), None);
        assert_eq!(parse_vsock("x:1"), None);
        assert_eq!(parse_vsock("3:-1"), None);
    }
}
