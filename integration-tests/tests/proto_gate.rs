//! The protobuf gate `make lint` runs, exercised with the real `buf`: the
//! tree's protos pass `buf lint` and `buf breaking` against the committed
//! v1 baseline, and a change that renumbers, retypes or removes a field of
//! the public API fails it.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::Output;

use qvirt_integration_tests::{COMMAND_TIMEOUT, run_command, text, tool_path, workspace_root};

/// Runs `buf ARGS` in `dir`.
fn buf(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(tool_path("buf"));
    cmd.args(args)
        .current_dir(dir)
        // buf keeps a cache; keep it out of the user's home.
        .env("BUF_CACHE_DIR", dir.join(".buf-cache"));
    run_command(&mut cmd, COMMAND_TIMEOUT)
}

/// A copy of the module (buf.yaml and proto/) with `edit` applied to
/// supervisor.proto.
fn edited_copy(edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let root = workspace_root();
    let tmp = tempfile::tempdir().unwrap();
    fs::copy(root.join("buf.yaml"), tmp.path().join("buf.yaml")).unwrap();
    let src = root.join("proto/qvirt/v1");
    let dst = tmp.path().join("proto/qvirt/v1");
    fs::create_dir_all(&dst).unwrap();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        let mut body = fs::read_to_string(&path).unwrap();
        if name == "supervisor.proto" {
            let edited = edit(&body);
            assert_ne!(edited, body, "the edit changed nothing");
            body = edited;
        }
        fs::write(dst.join(name), body).unwrap();
    }
    tmp
}

fn breaking_against_baseline(dir: &Path) -> Output {
    let baseline = workspace_root().join("proto/baseline.binpb");
    buf(dir, &["breaking", "--against", baseline.to_str().unwrap()])
}

#[test]
fn test_the_tree_passes_buf_lint_and_breaking() {
    let root = workspace_root();
    let out = buf(&root, &["lint"]);
    assert!(
        out.status.success(),
        "buf lint:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = breaking_against_baseline(&root);
    assert!(
        out.status.success(),
        "buf breaking:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn test_a_renumbered_field_fails_the_breaking_check() {
    let tmp = edited_copy(|s| s.replacen("  string uuid = 2;", "  string uuid = 99;", 1));
    let out = breaking_against_baseline(tmp.path());
    assert!(!out.status.success(), "renumbering passed the gate");
    let report = text(&out.stdout) + &text(&out.stderr);
    assert!(report.contains("\"uuid\""), "{report}");
}

#[test]
fn test_a_retyped_or_removed_field_fails_the_breaking_check() {
    let tmp =
        edited_copy(|s| s.replacen("  uint64 memory_mib = 3;", "  string memory_mib = 3;", 1));
    let out = breaking_against_baseline(tmp.path());
    assert!(!out.status.success(), "retyping passed the gate");
    assert!(
        text(&out.stdout).contains("memory_mib"),
        "{}",
        text(&out.stdout)
    );

    let tmp = edited_copy(|s| s.replacen("  uint32 vcpus = 4;\n", "", 1));
    let out = breaking_against_baseline(tmp.path());
    assert!(!out.status.success(), "removing a field passed the gate");
}

#[test]
fn test_a_lint_violation_fails_buf_lint() {
    // An enum whose zero value is not *_UNSPECIFIED, as STANDARD requires.
    let tmp = edited_copy(|s| format!("{s}\nenum Flavour {{\n  FLAVOUR_PLAIN = 0;\n}}\n"));
    let out = buf(tmp.path(), &["lint"]);
    assert!(!out.status.success(), "a bad enum passed buf lint");
    assert!(
        text(&out.stdout).contains("FLAVOUR_PLAIN"),
        "{}",
        text(&out.stdout)
    );
}
