//! qvirt-ga against the real qemu-ga 7.2 for the commands that change the
//! guest: guest-set-vcpus, guest-set-memory-blocks, the guest-ssh-*
//! commands, guest-set-user-password and guest-suspend-*.
//!
//! Each agent runs over its own scratch guest
//! (`qvirt_integration_tests::scratch_guest`: a private mount namespace
//! with a copy of `/etc` plus a user `alice`, a scratch `/home`, fake CPU
//! and memory sysfs trees). The paths the agents see are the real ones, so
//! their answers (errors included) compare byte for byte, and nothing on
//! the host changes: the real `chpasswd` rewrites the copy's
//! `/etc/shadow`. The two scratch guests are compared afterwards too.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use qvirt_integration_tests::scratch_guest::{PATH, ScratchGuest};

fn start_in(guest: &ScratchGuest, which: Which, path: &str) -> Agent {
    let wrapper = guest.wrapper(path);
    let wrapper: Vec<&OsStr> = wrapper.iter().map(|w| w.as_os_str()).collect();
    start_wrapped(which, &wrapper, "sock".as_ref(), &[], &[], |_| {})
}

/// Both agents, each over its own scratch guest.
struct Pair {
    agents: (Agent, Agent),
    trees: (ScratchGuest, ScratchGuest),
}

fn pair_with_path(path: &str) -> Pair {
    let trees = (ScratchGuest::new(), ScratchGuest::new());
    let agents = (
        start_in(&trees.0, Which::Qemu, path),
        start_in(&trees.1, Which::Qvirt, path),
    );
    Pair { agents, trees }
}

fn pair() -> Pair {
    pair_with_path(PATH)
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

#[test]
fn test_set_vcpus_stops_at_the_first_failure() {
    let p = pair();
    for req in [
        &b"{'execute':'guest-get-vcpus'}"[..],
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':1,'online':false},{'logical-id':2,'online':true},{'logical-id':0,'online':false},{'logical-id':1,'online':true}]}}",
        b"{'execute':'guest-get-vcpus'}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':0,'online':false}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':0,'online':true},{'logical-id':9,'online':true}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':9,'online':true}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':-1,'online':true}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':1,'online':true,'can-offline':false}]}}",
        // Argument errors, named as QAPI names them.
        b"{'execute':'guest-set-vcpus'}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':{}}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[1]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':0}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'online':true}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':'x','online':true}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':1,'online':true,'can-offline':1}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':1,'online':true,'x':1,'y':2}]}}",
        b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':1,'online':true}],'z':1}}",
    ] {
        same(&p.agents, &[req]);
    }
    // A CPU whose `online` reads empty: an error for both commands.
    for t in [&p.trees.0, &p.trees.1] {
        std::fs::create_dir_all(t.path("cpu/cpu3")).expect("mkdir");
        std::fs::write(t.path("cpu/cpu3/online"), "").expect("write");
    }
    same(
        &p.agents,
        &[b"{'execute':'guest-set-vcpus','arguments':{'vcpus':[{'logical-id':3,'online':true}]}}{'execute':'guest-get-vcpus'}"],
    );
    for cpu in ["cpu1", "cpu2", "cpu3"] {
        let rel = format!("cpu/{cpu}/online");
        assert_eq!(
            read(&p.trees.1.path(&rel)),
            read(&p.trees.0.path(&rel)),
            "{rel}"
        );
    }
    assert_eq!(read(&p.trees.1.path("cpu/cpu1/online")), "1\n");
}

#[test]
fn test_memory_blocks() {
    let p = pair();
    for req in [
        &b"{'execute':'guest-get-memory-block-info'}"[..],
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[{'phys-index':0,'online':false},{'phys-index':1,'online':true,'can-offline':true},{'phys-index':2,'online':false},{'phys-index':2,'online':true},{'phys-index':7,'online':true},{'phys-index':-1,'online':true},{'phys-index':0,'online':false}]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[{'phys-index':'x','online':true}]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[{'phys-index':1.5,'online':true}]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[{'phys-index':18446744073709551615,'online':true}]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[{'phys-index':18446744073709551616,'online':true}]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':[{'phys-index':1}]}}",
        b"{'execute':'guest-set-memory-blocks','arguments':{'mem-blks':'x'}}",
    ] {
        same(&p.agents, &[req]);
    }
    for rel in ["mem/memory0/state", "mem/memory1/state"] {
        assert_eq!(
            read(&p.trees.1.path(rel)),
            read(&p.trees.0.path(rel)),
            "{rel}"
        );
    }
}

fn ssh_state(tree: &ScratchGuest) -> Vec<(String, u32, u32, u32, String)> {
    ["home/alice/.ssh", "home/alice/.ssh/authorized_keys"]
        .iter()
        .filter_map(|rel| {
            let p = tree.path(rel);
            let m = std::fs::symlink_metadata(&p).ok()?;
            let content = if m.is_file() { read(&p) } else { String::new() };
            Some((
                rel.to_string(),
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                content,
            ))
        })
        .collect()
}

#[test]
fn test_ssh_authorized_keys() {
    let p = pair();
    let get = b"{'execute':'guest-ssh-get-authorized-keys','arguments':{'username':'alice'}}";
    for req in [
        &get[..],
        b"{'execute':'guest-ssh-remove-authorized-keys','arguments':{'username':'alice','keys':['k1']}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':['ssh-ed25519 AAAAk1 a@b','k2','ssh-ed25519 AAAAk1 a@b','']}}",
        get,
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':['k3',' k4 '],'reset':false}}",
        get,
        b"{'execute':'guest-ssh-remove-authorized-keys','arguments':{'username':'alice','keys':['k2','nope']}}",
        get,
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':['k5'],'reset':true}}",
        get,
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':[]}}",
        b"{'execute':'guest-ssh-remove-authorized-keys','arguments':{'username':'alice','keys':['k5']}}",
        get,
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':[],'reset':true}}",
        get,
        // Unknown users, a user whose home does not exist, bad keys.
        b"{'execute':'guest-ssh-get-authorized-keys','arguments':{'username':'nosuchuser'}}",
        b"{'execute':'guest-ssh-get-authorized-keys','arguments':{'username':''}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'nosuchuser','keys':['k']}}",
        b"{'execute':'guest-ssh-remove-authorized-keys','arguments':{'username':'nosuchuser','keys':['k']}}",
        b"{'execute':'guest-ssh-get-authorized-keys','arguments':{'username':'nobody'}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'nobody','keys':['k']}}",
        b"{'execute':'guest-ssh-remove-authorized-keys','arguments':{'username':'nobody','keys':['k']}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':['k','# comment']}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'nosuchuser','keys':['a\\nb']}}",
        b"{'execute':'guest-ssh-remove-authorized-keys','arguments':{'username':'alice','keys':['#']}}",
        // Argument errors.
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice'}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':[1]}}",
        b"{'execute':'guest-ssh-add-authorized-keys','arguments':{'username':'alice','keys':[],'reset':'yes'}}",
        b"{'execute':'guest-ssh-get-authorized-keys','arguments':{}}",
        b"{'execute':'guest-ssh-get-authorized-keys','arguments':{'username':1}}",
    ] {
        same(&p.agents, &[req]);
    }
    let (a, b) = (ssh_state(&p.trees.0), ssh_state(&p.trees.1));
    assert_eq!(b, a);
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!((a[0].1, a[0].2, a[0].3), (0o700, 4242, 4243));
    assert_eq!((a[1].1, a[1].2, a[1].3), (0o600, 4242, 4243));
}

#[test]
fn test_set_user_password_with_the_real_chpasswd() {
    let p = pair();
    for req in [
        // "$6$salt$hash", already crypted.
        &b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'JDYkc2FsdCRoYXNo','crypted':true}}"[..],
        b"{'execute':'guest-set-user-password','arguments':{'username':'nosuchuser','password':'c2VjcmV0','crypted':false}}",
        b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'!!!','crypted':false}}",
        b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'YQpi','crypted':false}}",
        b"{'execute':'guest-set-user-password','arguments':{'username':'a:b','password':'YQ==','crypted':false}}",
        b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'YQ=='}}",
        b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'YQ==','crypted':'no'}}",
    ] {
        same(&p.agents, &[req]);
    }
    assert_eq!(p.trees.0.shadow_hash("alice"), "$6$salt$hash");
    assert_eq!(p.trees.1.shadow_hash("alice"), "$6$salt$hash");
    // A clear-text password: chpasswd hashes it with a fresh salt, so
    // only the kind of hash compares.
    same(
        &p.agents,
        &[b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'c2VjcmV0','crypted':false}}"],
    );
    let (a, b) = (
        p.trees.0.shadow_hash("alice"),
        p.trees.1.shadow_hash("alice"),
    );
    assert!(a.starts_with('$') && a != "$6$salt$hash", "{a}");
    let scheme = |h: &str| h.split('$').nth(1).map(str::to_owned);
    assert_eq!(scheme(&b), scheme(&a));
    assert_ne!(b, "$6$salt$hash");
    // Nothing else in the shadow file changed.
    let rest = |t: &ScratchGuest| {
        read(&t.path("etc/shadow"))
            .lines()
            .filter(|l| !l.starts_with("alice:"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(rest(&p.trees.1), rest(&p.trees.0));
}

/// With no systemctl, pm-utils or chpasswd in `PATH` and an empty
/// `/sys/power/state`: no suspend method supports any mode, and
/// guest-set-user-password cannot find its helper.
#[test]
fn test_without_helper_programs() {
    let empty = tempfile::tempdir().expect("tempdir");
    let path = empty.path().to_str().expect("utf-8").to_owned();
    let p = pair_with_path(&path);
    for req in [
        &b"{'execute':'guest-suspend-disk','id':1}{'execute':'guest-suspend-ram','id':2}{'execute':'guest-suspend-hybrid','id':3}"[..],
        b"{'execute':'guest-suspend-ram','arguments':{'x':1}}",
        b"{'execute':'guest-set-user-password','arguments':{'username':'alice','password':'c2VjcmV0','crypted':false}}",
        b"{'execute':'guest-get-devices'}",
        b"{'execute':'guest-info'}",
    ] {
        same(&p.agents, &[req]);
    }
}
