//! A private libvirtd (Debian's libvirt 9, installed by `make deps`) for
//! the tests that use libvirt as a client and for the libvirt bench:
//! `src/libvirtd.py` runs it and its virtlogd in their own mount
//! namespace with their own qemu.conf, domain and hooks dirs over
//! /etc/libvirt's and their own /run/libvirt, /var/lib/libvirt,
//! /var/cache/libvirt and /var/log/libvirt (nothing outside its temp dir
//! changes, and it runs beside any other libvirtd), under a child
//! subreaper that reaps the QEMUs libvirt daemonizes at once, as systemd
//! would. Clients reach it at [`Libvirtd::uri`]. A libvirtd that cannot
//! start here fails the caller loudly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{GUEST_CMDLINE, Images};
use crate::{ChildGuard, QemuGuard, run_command, text};

/// One virsh command (a start is the slowest, well under this).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);
/// The QEMU libvirt runs.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// A running private libvirtd and its dir; dropping it stops it by pid.
pub struct Libvirtd {
    // Dropped first: the daemon stops before its dir goes.
    daemon: ChildGuard,
    dir: tempfile::TempDir,
}

impl Libvirtd {
    /// Starts one and waits until it listens; panics (with libvirtd's
    /// stderr and log) if it cannot.
    pub fn start() -> Libvirtd {
        for tool in ["/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/virsh"] {
            assert!(
                Path::new(tool).is_file(),
                "{tool} not found: run `make deps` (it installs libvirt 9)"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/libvirtd.py");
        let daemon = ChildGuard::spawn(
            Command::new("/usr/bin/python3")
                .arg(script)
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.path().join("daemon.out")).unwrap())
                .stderr(std::fs::File::create(dir.path().join("daemon.err")).unwrap()),
        );
        let mut lv = Libvirtd { daemon, dir };
        let socket = lv.socket();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            let exited = lv.daemon.try_wait();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "libvirtd did not listen on {} ({exited:?}): {}",
                socket.display(),
                lv.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lv
    }

    /// Its private dir (qemu.conf, domain XML, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The socket it listens on (its /run/libvirt/libvirt-sock).
    fn socket(&self) -> PathBuf {
        self.dir().join("run/libvirt-sock")
    }

    /// The URI a client connects with.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    /// libvirtd's stderr and log, for failure messages.
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir().join(f)).unwrap_or_default();
        format!(
            "stderr:\n{}\nlibvirtd.log:\n{}",
            read("daemon.err"),
            read("libvirtd.log")
        )
    }

    /// `virsh -c URI ARGS`, with a timeout.
    pub fn virsh<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new("/usr/bin/virsh");
        cmd.args(["-q", "-c", &self.uri()]).args(args);
        run_command(&mut cmd, VIRSH_TIMEOUT)
    }

    /// `virsh ARGS` that must succeed: its stdout.
    pub fn virsh_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {:?} failed: {}{}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// Defines and starts domain `xml` named `name`: a guard that destroys
    /// and undefines it, and kills its QEMU by pid if that fails.
    pub fn start_domain(&self, name: &str, xml: &str) -> Domain<'_> {
        let file = self.dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        self.virsh_ok(&[Path::new("define"), &file]);
        let mut domain = Domain {
            lv: self,
            name: name.to_owned(),
            _qemu: None,
        };
        self.virsh_ok(&["start", name]);
        let uuid = self.virsh_ok(&["domuuid", name]).trim().to_owned();
        let pid = std::fs::read_to_string(self.dir().join(format!("run/qemu/{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        domain._qemu = Some(QemuGuard(pid, uuid));
        domain
    }
}

/// A domain of a [`Libvirtd`], destroyed and undefined on drop.
pub struct Domain<'a> {
    lv: &'a Libvirtd,
    /// Its name.
    pub name: String,
    _qemu: Option<QemuGuard>,
}

impl Domain<'_> {
    /// Waits up to `timeout` until its agent answers a guest-ping through
    /// libvirt; panics with the last error otherwise.
    pub fn wait_agent(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.lv.virsh(&[
                "qemu-agent-command",
                &self.name,
                r#"{"execute":"guest-ping"}"#,
                "--timeout",
                "2",
            ]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent of {} never answered within {timeout:?}: {}",
                self.name,
                text(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        let _ = self.lv.virsh(&["destroy", &self.name]);
        let _ = self.lv.virsh(&["undefine", &self.name]);
    }
}

/// The project's test guest under libvirt: TCG, 128 MiB, `vcpus`, q35,
/// its kernel and initramfs, the serial console into `console`, and an
/// agent channel (virtio-serial `org.qemu.guest_agent.0`) on the unix
/// socket `agent`, or one libvirt names when `None`.
pub fn guest_xml(
    name: &str,
    images: &Images,
    vcpus: u32,
    console: &Path,
    agent: Option<&Path>,
) -> String {
    let source = agent
        .map(|p| format!("<source mode='bind' path='{}'/>", p.display()))
        .unwrap_or_default();
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>{vcpus}</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>{GUEST_CMDLINE}</cmdline></os>\
         <devices><emulator>{QEMU}</emulator>\
         <serial type='file'><source path='{}'/></serial>\
         <channel type='unix'>{source}<target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <memballoon model='none'/><controller type='usb' model='none'/></devices></domain>",
        images.vmlinux.display(),
        images.initramfs.display(),
        console.display()
    )
}
