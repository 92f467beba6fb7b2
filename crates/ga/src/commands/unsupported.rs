//! guest-get-devices, which qemu-ga 7.2 has only on Windows: it is on the
//! POSIX platform block list (disabled in guest-info, refused as
//! disabled), and would answer GenericError "this feature or command is
//! not currently supported" if enabled anyway (`-a` does not re-enable
//! it).

use crate::agent::{Agent, CmdResult};
use crate::args::Args;
use crate::commands::unsupported_error;

/// guest-get-devices.
pub fn no_args(_agent: &mut Agent, args: &mut Args) -> CmdResult {
    args.done()?;
    Err(unsupported_error())
}
