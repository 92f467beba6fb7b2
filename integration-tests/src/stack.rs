//! A whole qvirt stack behind a real gateway, as a user meets it: event
//! bus, supervisor (with agentd for agent-mode shutdown and an image root
//! QEMU can reach), agentd and a gateway with a read-write and a
//! read-only token (also in files) and both unix sockets; and the tiny
//! test guest (`scripts/build-test-guest.sh` with the static qvirt-ga).
//! For tests that drive the stack from outside (qvirtctl, `make run`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{
    Service, bin_path, free_port, run, run_command, start_supervisor, static_ga, text,
    workspace_root, write_internal_token,
};

pub use crate::{Token, token_new};

/// The backends and a gateway in front of them. Dropped in field order:
/// the gateway first, the bus last.
pub struct GatewayStack {
    /// The gateway.
    pub gw: Service,
    /// The agent service.
    pub agentd: Service,
    /// The supervisor.
    pub sup: Service,
    /// The event bus.
    pub bus: Service,
    /// A file holding the read-write token.
    pub rw_token: PathBuf,
    /// A file holding the read-only token.
    pub ro_token: PathBuf,
    /// The gateway's read-write unix socket.
    pub rw_sock: PathBuf,
    /// The gateway's read-only unix socket.
    pub ro_sock: PathBuf,
    /// The supervisor's image root (mode 0755: QEMU's user reads it).
    pub images: PathBuf,
    /// The supervisor's state dir.
    pub state: PathBuf,
    /// Holds all of the above.
    pub dir: tempfile::TempDir,
}

impl GatewayStack {
    /// Starts everything and waits until the gateway serves every public
    /// service.
    pub async fn start() -> GatewayStack {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        mode(dir.path(), 0o755).unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        mode(&images, 0o755).unwrap();
        let mut bus = Service::start("qvirt-eventbus", &[]);
        bus.wait_serving("qvirt.v1.EventBus").await;
        let agentd_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let agentd_url = format!("http://{agentd_addr}");
        let state = dir.path().join("state");
        let sup = start_supervisor(
            &state,
            &dir.path().join("run"),
            None,
            &[
                "--eventbus",
                &bus.url(),
                "--agentd",
                &agentd_url,
                "--image-root",
                images.to_str().unwrap(),
            ],
        )
        .await;
        let mut agentd =
            Service::start_at("qvirt-agentd", agentd_addr, &["--supervisor", &sup.url()]);
        agentd.wait_serving("qvirt.v1.GuestAgent").await;
        let rw = token_new("operator", "read-write");
        let ro = token_new("viewer", "read-only");
        let rw_token = dir.path().join("token-rw");
        let ro_token = dir.path().join("token-ro");
        std::fs::write(&rw_token, format!("{}\n", rw.token)).unwrap();
        std::fs::write(&ro_token, format!("{}\n", ro.token)).unwrap();
        let rw_sock = dir.path().join("gw.sock");
        let ro_sock = dir.path().join("gw-ro.sock");
        let yaml = format!(
            "supervisor: {}\neventbus: {}\nagentd: {}\ninternal_token_file: {}\n\
             health_poll_ms: 200\nrw_socket:\n  path: {}\nro_socket:\n  path: {}\ntokens:\n{}{}",
            sup.url(),
            bus.url(),
            agentd.url(),
            write_internal_token(dir.path()).display(),
            rw_sock.display(),
            ro_sock.display(),
            rw.entry,
            ro.entry,
        );
        let mut gw = Service::start_with_config("qvirt-gateway", &yaml, &[]);
        for svc in [
            "",
            "qvirt.v1.Supervisor",
            "qvirt.v1.EventBus",
            "qvirt.v1.GuestAgent",
        ] {
            gw.wait_serving(svc).await;
        }
        GatewayStack {
            gw,
            agentd,
            sup,
            bus,
            rw_token,
            ro_token,
            rw_sock,
            ro_sock,
            images,
            state,
            dir,
        }
    }
}

/// The test guest's kernel and initramfs.
pub use crate::guest::Image as GuestImage;

/// Builds (or reuses, in target/test-guest) the test guest with the
/// static qvirt-ga inside, or says why Debian's packages cannot be
/// fetched here; any other failure panics.
pub fn test_guest() -> Result<GuestImage, String> {
    crate::guest::guest_image(&static_ga())
}

/// Copies the guest's files into `root` (world-readable), returning
/// (vmlinux, initramfs) there.
pub fn install_guest(image: &GuestImage, root: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let copy = |from: &Path| {
        let to = root.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        to
    };
    (copy(&image.vmlinux), copy(&image.initramfs))
}
