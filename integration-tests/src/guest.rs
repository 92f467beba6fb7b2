//! The tiny test guest: Debian's kernel and a busybox initramfs whose
//! agent is the static qvirt-ga (`scripts/build-test-guest.sh`), built
//! once into `target/test-guest` and copied into a test's image root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{run_command, text};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built guest image.
pub struct Image {
    /// The kernel (an ELF vmlinux, booted through PVH).
    pub vmlinux: PathBuf,
    /// Its initramfs.
    pub initramfs: PathBuf,
    /// The Debian kernel package it boots, e.g. linux-image-6.1.0-57-amd64.
    pub kernel_package: String,
}

/// Kernel and initramfs with `agent` inside, or why the packages cannot be
/// fetched here (the script's exit status 77); any other failure panics.
pub fn guest_image(agent: &Path) -> Result<Image, String> {
    guest_image_named("test-guest", agent)
}

/// [`guest_image`] built into `target/NAME`: a guest with another agent
/// (Debian's qemu-ga) must not replace the one other tests boot.
pub fn guest_image_named(name: &str, agent: &Path) -> Result<Image, String> {
    let out = repo().join("target").join(name);
    let mut script = Command::new("bash");
    script
        .arg(repo().join("scripts/build-test-guest.sh"))
        .arg(&out)
        .arg(agent);
    let result = run_command(&mut script, Duration::from_secs(900));
    let stderr = text(&result.stderr);
    match result.status.code() {
        Some(0) => {}
        Some(77) => return Err(stderr.trim().to_owned()),
        _ => panic!("build-test-guest.sh failed ({}):\n{stderr}", result.status),
    }
    // Its last line ends with "(linux-image-...)".
    let stdout = text(&result.stdout);
    let kernel_package = stdout
        .trim_end()
        .rsplit_once('(')
        .and_then(|(_, p)| p.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no kernel package in {stdout:?}"))
        .to_owned();
    Ok(Image {
        vmlinux: out.join("vmlinux"),
        initramfs: out.join("initramfs"),
        kernel_package,
    })
}

/// Kernel and initramfs copied into `dir/images` (made traversable, the
/// files world-readable), the image root of the test's supervisor.
#[derive(Debug, Clone)]
pub struct Images {
    /// The image root (`--image-root`).
    pub root: PathBuf,
    /// The kernel in it.
    pub vmlinux: PathBuf,
    /// The initramfs in it.
    pub initramfs: PathBuf,
}

/// Copy `image` into `dir/images`; see [`Images`].
pub fn guest_images(dir: &Path, image: &Image) -> Images {
    guest_images_in(dir, "images", image)
}

/// Copy `image` into `dir/name` (a second copy for another hypervisor,
/// which relabels what it is given); see [`Images`].
pub fn guest_images_in(dir: &Path, name: &str, image: &Image) -> Images {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(dir, 0o755);
    let root = dir.join(name);
    std::fs::create_dir(&root).unwrap();
    mode(&root, 0o755);
    let copy = |from: &Path| {
        let to = root.join(from.file_name().unwrap());
        std::fs::copy(from, &to).unwrap();
        mode(&to, 0o644);
        to
    };
    Images {
        vmlinux: copy(&image.vmlinux),
        initramfs: copy(&image.initramfs),
        root: root.clone(),
    }
}

/// The test guest's kernel command line: a serial console, no reboot on
/// panic, and TCG-friendly timing (no mitigations, a fixed TSC rate).
pub const GUEST_CMDLINE: &str =
    "console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check";

/// The definition of the test guest `name` booting `images`, with its
/// agent and its serial console in `serial_log`.
pub fn guest_yaml(name: &str, images: &Images, serial_log: &Path) -> String {
    format!(
        "name: {name}\nmemory_mib: 128\nvcpus: 1\nmachine: q35\naccel: tcg\nkernel: {}\ninitrd: {}\ncmdline: {GUEST_CMDLINE}\nagent: true\nserial_log: {}\n",
        images.vmlinux.display(),
        images.initramfs.display(),
        serial_log.display()
    )
}

/// The guest's serial console log, or why there is none.
pub fn serial(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no serial log: {e})"))
}
