//! Guest confinement with the real supervisor, real QEMU (TCG) and real
//! grpcurl: QEMU runs as the unprivileged `qvirt-qemu` user (`make deps`
//! creates it) in its seccomp sandbox, so an `exec:` migration through
//! MonitorCommand runs nothing and QEMU dies of SIGSYS (the domain is
//! reported crashed); a read-write disk belongs to QEMU's user while the
//! guest runs and gets its owner back after; paths outside the configured
//! roots are refused at define and again at start, leaving the files
//! untouched; and QEMU inherits no fd the supervisor did not mean to give
//! it.
//!
//! These tests run as root (here and in CI), as the supervisor does.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qvirt_integration_tests::{
    InternalChannel, QemuGuard, Service, define_yaml, grpcurl_internal, internal_channel,
    run_command, start_supervisor, text, tool_path,
};
use qvirt_proto::v1::supervisor_client::SupervisorClient;
use qvirt_proto::v1::{
    DestroyDomainRequest, Domain, DomainState, DomainStateReason, GetDomainRequest,
    StartDomainRequest, UndefineDomainRequest,
};
use tonic::Code;

/// Bound on waiting for a state the supervisor reports.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The user `make deps` creates for QEMU.
const QEMU_USER: &str = "qvirt-qemu";

/// A test's temp dir, traversable by QEMU's user (QEMU opens disk images
/// by path), with the supervisor's state and run dirs in it.
struct Dirs {
    tmp: tempfile::TempDir,
    state: PathBuf,
    run: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        tool_path("qemu-system-x86_64");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Dirs {
            state: tmp.path().join("state"),
            run: tmp.path().join("run"),
            tmp,
        }
    }

    fn images(&self) -> PathBuf {
        self.state.join("images")
    }
}

/// `id -u USER` / `id -g USER`: QEMU's user as the system knows it.
fn qemu_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = run_command(
            Command::new("id").args([flag, QEMU_USER]),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "no user {QEMU_USER}: run `make deps` ({})",
            text(&out.stderr)
        );
        text(&out.stdout).trim().parse::<u32>().unwrap()
    };
    (id("-u"), id("-g"))
}

/// A field of /proc/PID/status, e.g. `Uid`.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

async fn get(client: &mut SupervisorClient<InternalChannel>, name: &str) -> Domain {
    client
        .get_domain(GetDomainRequest {
            domain: name.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
}

async fn start(
    client: &mut SupervisorClient<InternalChannel>,
    name: &str,
) -> Result<Domain, tonic::Status> {
    client
        .start_domain(StartDomainRequest {
            domain: name.to_owned(),
            paused: false,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().domain.unwrap())
}

/// Poll GetDomain until `state`, with a deadline.
async fn wait_state(
    client: &mut SupervisorClient<InternalChannel>,
    sup: &Service,
    name: &str,
    state: DomainState,
) -> Domain {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let d = get(client, name).await;
        if d.state() == state {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not {state:?} within {STATE_TIMEOUT:?}: {:?}/{:?}; stderr:\n{}",
            d.state(),
            d.reason(),
            sup.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn owner(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

/// Domain `name` with one root-owned read-write disk `file` (`size` bytes,
/// `mode`) in the default image root, defined and started: the disk's
/// path, the running domain, and a guard that kills its QEMU.
async fn start_with_disk(
    client: &mut SupervisorClient<InternalChannel>,
    dirs: &Dirs,
    name: &str,
    file: &str,
    size: usize,
    mode: u32,
) -> (PathBuf, Domain, QemuGuard) {
    let disk = dirs.images().join(file);
    std::fs::write(&disk, vec![0u8; size]).unwrap();
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(mode)).unwrap();
    assert_eq!(owner(&disk), (0, 0, mode));
    let spec = format!(
        "name: {name}\nmemory_mib: 64\naccel: tcg\ndisks: [{{path: {}}}]\n",
        disk.display()
    );
    let uuid = define_yaml(client, spec).await.unwrap().spec.unwrap().uuid;
    let d = start(client, name).await.unwrap();
    let guard = QemuGuard(d.pid, uuid);
    (disk, d, guard)
}

#[tokio::test(flavor = "multi_thread")]
async fn test_exec_migration_runs_nothing_and_kills_the_sandboxed_qemu() {
    let (qemu_uid, qemu_gid) = qemu_ids();
    let dirs = Dirs::new();
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);

    // A root-owned read-write disk in the default image root.
    let (disk, d, _guard) =
        start_with_disk(&mut client, &dirs, "confined", "root.img", 1 << 20, 0o644).await;
    assert_eq!(d.state(), DomainState::Running);

    // QEMU runs as qvirt-qemu (real, effective, saved, fs ids), under a
    // seccomp filter (mode 2).
    let want_uid = format!("{qemu_uid}\t{qemu_uid}\t{qemu_uid}\t{qemu_uid}");
    let want_gid = format!("{qemu_gid}\t{qemu_gid}\t{qemu_gid}\t{qemu_gid}");
    assert_eq!(proc_status(d.pid, "Uid"), want_uid);
    assert_eq!(proc_status(d.pid, "Gid"), want_gid);
    assert_eq!(proc_status(d.pid, "Seccomp"), "2");
    // The disk is QEMU's user's while the guest runs.
    assert_eq!(owner(&disk), (qemu_uid, qemu_gid, 0o644));

    // What the audit ran: a shell command through an exec: migration. The
    // target dir is writable by everyone, so only the sandbox stops it.
    let out_dir = dirs.tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let pwned = out_dir.join("pwned");
    let command = serde_json_text(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:id > {}"}}}}"#,
        pwned.display()
    ));
    let request = format!(r#"{{"domain":"confined","command_json":{command}}}"#);
    let addr = sup.addr.to_string();
    // QEMU dies during the command: the reply is an error (UNAVAILABLE,
    // monitor closed), whatever it is the file must not appear.
    let reply = grpcurl_internal(&[
        "-plaintext",
        "-d",
        &request,
        &addr,
        "qvirt.v1.Supervisor/MonitorCommand",
    ]);
    let d = wait_state(&mut client, &sup, "confined", DomainState::Shutoff).await;
    assert_eq!(
        d.reason(),
        DomainStateReason::ShutoffCrashed,
        "grpcurl: {}{}",
        text(&reply.stdout),
        text(&reply.stderr)
    );
    assert!(!pwned.exists(), "the exec: migration ran a command");
    assert!(
        sup.stderr().contains("signal: 31 (SIGSYS)"),
        "QEMU not killed by the sandbox; stderr:\n{}",
        sup.stderr()
    );
    // Its owner and mode are back.
    assert_eq!(owner(&disk), (0, 0, 0o644));
}

/// `text` as a JSON string literal (for a JSON document inside another).
fn serde_json_text(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn test_paths_outside_the_roots_are_refused_and_left_untouched() {
    let dirs = Dirs::new();
    let mut sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);

    // Host files a definition must not reach.
    let victim = dirs.tmp.path().join("victim.db");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let victim_log = dirs.tmp.path().join("victim.log");
    std::fs::write(&victim_log, "old log\n").unwrap();
    // A symlink inside the image root pointing out of it.
    std::os::unix::fs::symlink(&victim, dirs.images().join("link.img")).unwrap();

    let images = dirs.images().display().to_string();
    let serial_dir = dirs.state.join("serial/escape").display().to_string();
    let cases = [
        (
            format!("disks: [{{path: {}}}]", victim.display()),
            "disks[0].path",
            "image_roots",
            &images,
        ),
        (
            format!("disks: [{{path: {images}/link.img}}]"),
            "disks[0].path",
            "image_roots",
            &images,
        ),
        (
            format!("kernel: {images}/../../victim.db"),
            "kernel",
            "image_roots",
            &images,
        ),
        (
            format!("serial_log: {}", victim_log.display()),
            "serial_log",
            "serial_log_roots",
            &serial_dir,
        ),
    ];
    for (extra, field, roots, root) in &cases {
        let spec = format!("name: escape\nmemory_mib: 64\naccel: tcg\n{extra}\n");
        let err = define_yaml(&mut client, spec).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{extra}: {err:?}");
        assert!(
            err.message().contains(field)
                && err.message().contains(roots)
                && err.message().contains(root.as_str()),
            "{extra}: {}",
            err.message()
        );
    }

    // Defined under the root, then the root moves (config change): the
    // start is refused before any QEMU runs.
    let disk = dirs.images().join("ok.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let spec = format!(
        "name: moved\nmemory_mib: 64\naccel: tcg\ndisks: [{{path: {}}}]\n",
        disk.display()
    );
    define_yaml(&mut client, spec).await.unwrap();
    drop(client);
    sup.terminate();
    let other_root = dirs.tmp.path().join("other-images");
    let other = other_root.to_str().unwrap();
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &["--image-root", other]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let err = start(&mut client, "moved").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("disks[0].path") && err.message().contains(other),
        "{}",
        err.message()
    );
    let d = get(&mut client, "moved").await;
    assert_eq!((d.state(), d.pid), (DomainState::Shutoff, 0));
    assert_eq!(owner(&disk).0, 0);

    // Nothing was written, truncated or re-owned.
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(owner(&victim), (0, 0, 0o600));
    assert_eq!(std::fs::read_to_string(&victim_log).unwrap(), "old log\n");
}

/// The fds of `pid`: number and link target.
fn fds(pid: u32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

#[tokio::test(flavor = "multi_thread")]
async fn test_qemu_inherits_no_fd_of_the_supervisor() {
    let dirs = Dirs::new();
    // An fd the supervisor inherits without close-on-exec, as from a
    // careless parent.
    let marker = dirs.tmp.path().join("inherited-marker");
    let file = std::fs::File::create(&marker).unwrap();
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd this test owns; only its flags change.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    assert_eq!(rc, 0);
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    drop(file);
    let marker_text = marker.display().to_string();
    assert!(
        fds(sup.pid()).iter().any(|(_, t)| *t == marker_text),
        "the supervisor did not inherit the marker fd"
    );
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let serial = dirs.state.join("serial/leak/console.log");
    let spec = format!(
        "name: leak\nmemory_mib: 64\naccel: tcg\nagent: true\nserial_log: {}\n",
        serial.display()
    );
    let uuid = define_yaml(&mut client, spec)
        .await
        .unwrap()
        .spec
        .unwrap()
        .uuid;
    let d = start(&mut client, "leak").await.unwrap();
    let _guard = QemuGuard(d.pid, uuid);

    let qemu_fds = fds(d.pid);
    let log = dirs.state.join("logs/leak.log").display().to_string();
    // What the supervisor meant QEMU to have: stdio, the log, the serial
    // log, the monitor and agent listeners; QEMU's own fds are eventfds,
    // signalfds and the like, and the sockets it accepts on.
    assert_eq!(qemu_fds[0], (0, "/dev/null".to_owned()), "{qemu_fds:?}");
    assert_eq!(qemu_fds[1], (1, log.clone()), "{qemu_fds:?}");
    assert_eq!(qemu_fds[2], (2, log.clone()), "{qemu_fds:?}");
    for (fd, target) in &qemu_fds[3..] {
        let expected = target.starts_with("anon_inode:")
            || target.starts_with("socket:")
            || *target == serial.display().to_string();
        assert!(
            expected,
            "QEMU has fd {fd} -> {target} it was not meant to have: {qemu_fds:?}"
        );
    }
    // Two listening sockets were given (monitor, agent), and the
    // supervisor is connected to the monitor.
    let sockets = qemu_fds
        .iter()
        .filter(|(_, t)| t.starts_with("socket:"))
        .count();
    assert!(sockets >= 2, "{qemu_fds:?}");
    client
        .destroy_domain(DestroyDomainRequest {
            domain: "leak".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread")]
async fn test_disk_owner_is_restored_by_the_next_supervisor_after_a_kill() {
    let (qemu_uid, _) = qemu_ids();
    let dirs = Dirs::new();
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let (disk, d, _guard) =
        start_with_disk(&mut client, &dirs, "orphan", "data.img", 4096, 0o640).await;
    let uuid = d.spec.clone().unwrap().uuid;
    assert_eq!(owner(&disk).0, qemu_uid);

    // The supervisor dies, then its QEMU, while nobody watches.
    drop(client);
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup.pid() as i32, libc::SIGKILL) };
    qvirt_integration_tests::kill_domain_qemu(d.pid, &uuid);
    let deadline = Instant::now() + STATE_TIMEOUT;
    while pid_alive(sup.pid()) || pid_alive(d.pid) {
        assert!(Instant::now() < deadline, "supervisor or QEMU still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(owner(&disk).0, qemu_uid);

    // The next supervisor finds the QEMU gone and gives the disk back
    // before it serves.
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    assert_eq!(owner(&disk), (0, 0, 0o640));
    let d = get(&mut client, "orphan").await;
    assert_eq!(
        (d.state(), d.reason()),
        (DomainState::Shutoff, DomainStateReason::ShutoffCrashed)
    );
}

/// A disk whose ownership cannot be given back at stop (its path now a
/// symlink) keeps its record: Undefine refuses rather than delete the
/// status file that holds it, and succeeds once the file is back.
#[tokio::test(flavor = "multi_thread")]
async fn test_undefine_keeps_a_domain_whose_disk_could_not_be_given_back() {
    let (qemu_uid, _) = qemu_ids();
    let dirs = Dirs::new();
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    let (disk, _d, _guard) =
        start_with_disk(&mut client, &dirs, "kept", "kept.img", 4096, 0o640).await;
    assert_eq!(owner(&disk).0, qemu_uid);
    // The image moves and a symlink takes its place: the restore, which
    // never follows one, cannot reach it.
    let moved = dirs.images().join("kept.img.moved");
    std::fs::rename(&disk, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &disk).unwrap();
    client
        .destroy_domain(DestroyDomainRequest {
            domain: "kept".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(owner(&moved).0, qemu_uid);

    let refused = client
        .undefine_domain(UndefineDomainRequest {
            domain: "kept".into(),
            destroy: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("kept.img"), "{refused}");
    assert_eq!(get(&mut client, "kept").await.state(), DomainState::Shutoff);

    // The file back in place: the next Undefine gives it back and goes.
    std::fs::remove_file(&disk).unwrap();
    std::fs::rename(&moved, &disk).unwrap();
    client
        .undefine_domain(UndefineDomainRequest {
            domain: "kept".into(),
            destroy: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(owner(&disk), (0, 0, 0o640));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_tap_nic_is_opened_by_the_supervisor_for_the_unprivileged_qemu() {
    let dirs = Dirs::new();
    let sup = start_supervisor(&dirs.state, &dirs.run, None, &[]).await;
    let mut client = SupervisorClient::new(internal_channel(sup.url()).await);
    // A name no other test uses; the tap lives as long as its fds.
    let ifname = format!("qvt{:x}", std::process::id() & 0xff_ffff);
    let spec = format!(
        "name: tapped\nmemory_mib: 64\naccel: tcg\nnetworks: [{{tap: {{ifname: {ifname}}}}}]\n"
    );
    let uuid = define_yaml(&mut client, spec)
        .await
        .unwrap()
        .spec
        .unwrap()
        .uuid;
    // /dev/net/tun is root's: QEMU as qvirt-qemu could not open it.
    let d = start(&mut client, "tapped").await.unwrap();
    let _guard = QemuGuard(d.pid, uuid);
    assert_eq!(d.state(), DomainState::Running);
    assert!(
        Path::new(&format!("/sys/class/net/{ifname}")).exists(),
        "no tap {ifname}"
    );
    assert!(
        fds(d.pid).iter().any(|(_, t)| t == "/dev/net/tun"),
        "QEMU has no tap fd: {:?}",
        fds(d.pid)
    );
    client
        .destroy_domain(DestroyDomainRequest {
            domain: "tapped".into(),
            graceful: false,
            ..Default::default()
        })
        .await
        .unwrap();
    // Created for this run, gone with it.
    assert!(!Path::new(&format!("/sys/class/net/{ifname}")).exists());
}
