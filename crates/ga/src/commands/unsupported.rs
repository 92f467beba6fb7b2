//! Commands qemu-ga 7.2 has that qvirt-ga does not implement yet. Their
//! arguments are still checked as qemu-ga checks them, then they answer
//! GenericError "this feature or command is not currently supported" (the
//! answer qemu-ga itself gives where a platform lacks a feature).

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::unsupported_error;

/// A command without arguments.
pub fn no_args(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    Err(unsupported_error())
}

/// guest-set-vcpus `{vcpus: [...]}` (items not checked).
pub fn set_vcpus(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.any("vcpus")?;
    args.done()?;
    Err(unsupported_error())
}

/// guest-set-user-password `{username, password, crypted}`.
pub fn set_user_password(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.str("username")?;
    args.str("password")?;
    args.bool("crypted")?;
    args.done()?;
    Err(unsupported_error())
}

/// guest-set-memory-blocks `{mem-blks: [...]}` (items not checked).
pub fn set_memory_blocks(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.any("mem-blks")?;
    args.done()?;
    Err(unsupported_error())
}

/// guest-ssh-get-authorized-keys `{username}`.
pub fn ssh_get(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.str("username")?;
    args.done()?;
    Err(unsupported_error())
}

/// guest-ssh-add-authorized-keys `{username, keys, reset?}`.
pub fn ssh_add(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.str("username")?;
    args.str_list("keys")?;
    args.opt_bool("reset")?;
    args.done()?;
    Err(unsupported_error())
}

/// guest-ssh-remove-authorized-keys `{username, keys}`.
pub fn ssh_remove(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.str("username")?;
    args.str_list("keys")?;
    args.done()?;
    Err(unsupported_error())
}
