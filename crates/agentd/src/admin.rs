//! The calls that administer the guest where libvirt has a verb for it:
//! guest CPUs (`virsh guestvcpus`, `setvcpus --guest`), a user's password
//! (`virsh set-user-password`) and authorized SSH keys (`virsh
//! get-user-sshkeys`, `set-user-sshkeys`). Each checks and bounds its
//! request, then sends one qemu-ga command.

use qvirt_proto::v1 as pb;
use serde::Deserialize;
use serde_json::json;

use crate::call::{Target, no_nul};
use crate::status::CallError;

/// Most CPUs one SetGuestVcpus may name (the kernel's own maximum).
pub const MAX_VCPU_CHANGES: usize = 4096;
/// Longest guest user name.
pub const MAX_USER_BYTES: usize = 256;
/// Longest password or password hash.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Most keys in one Add/RemoveAuthorizedKeys.
pub const MAX_KEYS: usize = 1024;
/// Longest single key.
pub const MAX_KEY_BYTES: usize = 16 * 1024;

/// One entry of guest-get-vcpus.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Vcpu {
    logical_id: i64,
    online: bool,
    #[serde(default)]
    can_offline: bool,
}

/// guest-ssh-get-authorized-keys.
#[derive(Debug, Deserialize)]
struct AuthorizedKeys {
    keys: Vec<String>,
}

/// guest-get-vcpus as the proto's list.
pub(crate) async fn get_vcpus(t: &Target<'_>) -> Result<pb::GetGuestVcpusResponse, CallError> {
    let list: Vec<Vcpu> = t.get("guest-get-vcpus", None).await?;
    Ok(pb::GetGuestVcpusResponse {
        vcpus: list
            .into_iter()
            .map(|v| pb::GuestVcpu {
                logical_id: v.logical_id,
                online: v.online,
                can_offline: v.can_offline,
            })
            .collect(),
    })
}

/// Checks SetGuestVcpus's list: 1 to [`MAX_VCPU_CHANGES`] entries, ids not
/// negative.
pub(crate) fn check_vcpus(req: &pb::SetGuestVcpusRequest) -> Result<(), CallError> {
    if req.vcpus.is_empty() {
        return Err(CallError::request("vcpus", "must name at least one CPU"));
    }
    if req.vcpus.len() > MAX_VCPU_CHANGES {
        return Err(CallError::request(
            "vcpus",
            format!("names more than {MAX_VCPU_CHANGES} CPUs"),
        ));
    }
    for (i, v) in req.vcpus.iter().enumerate() {
        if v.logical_id < 0 {
            return Err(CallError::request(
                format!("vcpus[{i}].logical_id"),
                "must not be negative",
            ));
        }
    }
    Ok(())
}

/// guest-set-vcpus: how many changes the agent applied.
pub(crate) async fn set_vcpus(
    t: &Target<'_>,
    req: &pb::SetGuestVcpusRequest,
) -> Result<pb::SetGuestVcpusResponse, CallError> {
    let vcpus: Vec<_> = req
        .vcpus
        .iter()
        .map(|v| json!({ "logical-id": v.logical_id, "online": v.online }))
        .collect();
    let n: i64 = t
        .get("guest-set-vcpus", Some(json!({ "vcpus": vcpus })))
        .await?;
    Ok(pb::SetGuestVcpusResponse {
        processed: u32::try_from(n).unwrap_or(0),
    })
}

/// A guest user name: required, bounded, no NUL.
fn check_user(user: &str) -> Result<(), CallError> {
    if user.is_empty() {
        return Err(CallError::request("user", "is required"));
    }
    if user.len() > MAX_USER_BYTES {
        return Err(CallError::request(
            "user",
            format!("is longer than {MAX_USER_BYTES} bytes"),
        ));
    }
    no_nul("user", user)
}

/// Checks SetUserPassword: the user also without ':' or newline, the
/// password bounded without newline or NUL (chpasswd reads `USER:PASSWORD`
/// lines).
pub(crate) fn check_password(req: &pb::SetUserPasswordRequest) -> Result<(), CallError> {
    check_user(&req.user)?;
    if req.user.contains([':', '\n']) {
        return Err(CallError::request(
            "user",
            "must not contain ':' or a newline",
        ));
    }
    if req.password.len() > MAX_PASSWORD_BYTES {
        return Err(CallError::request(
            "password",
            format!("is longer than {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    if req.password.contains(['\n', '\0']) {
        return Err(CallError::request(
            "password",
            "must not contain a newline or a NUL byte",
        ));
    }
    Ok(())
}

/// guest-set-user-password (the password goes base64-encoded, as qemu-ga
/// takes it).
pub(crate) async fn set_password(
    t: &Target<'_>,
    req: &pb::SetUserPasswordRequest,
) -> Result<(), CallError> {
    use base64::Engine;
    let password = base64::engine::general_purpose::STANDARD.encode(req.password.as_bytes());
    let args = json!({ "username": req.user, "password": password, "crypted": req.crypted });
    t.call("guest-set-user-password", Some(args))
        .await
        .map(drop)
}

/// Checks the user of GetAuthorizedKeys.
pub(crate) fn check_keys_user(user: &str) -> Result<(), CallError> {
    check_user(user)
}

/// Checks a key list: bounded, each key one line that is not a comment.
pub(crate) fn check_keys(user: &str, keys: &[String]) -> Result<(), CallError> {
    check_user(user)?;
    if keys.len() > MAX_KEYS {
        return Err(CallError::request(
            "keys",
            format!("holds more than {MAX_KEYS} keys"),
        ));
    }
    for (i, k) in keys.iter().enumerate() {
        let field = format!("keys[{i}]");
        if k.len() > MAX_KEY_BYTES {
            return Err(CallError::request(
                field,
                format!("is longer than {MAX_KEY_BYTES} bytes"),
            ));
        }
        no_nul(&field, k)?;
        if k.contains('\n') {
            return Err(CallError::request(field, "must not contain a newline"));
        }
        if k.starts_with('#') {
            return Err(CallError::request(
                field,
                "is a comment, not an OpenSSH public key",
            ));
        }
    }
    Ok(())
}

/// guest-ssh-get-authorized-keys.
pub(crate) async fn get_keys(t: &Target<'_>, user: &str) -> Result<Vec<String>, CallError> {
    let k: AuthorizedKeys = t
        .get(
            "guest-ssh-get-authorized-keys",
            Some(json!({ "username": user })),
        )
        .await?;
    Ok(k.keys)
}

/// guest-ssh-add-authorized-keys (`reset` only sent when set, as libvirt
/// does).
pub(crate) async fn add_keys(
    t: &Target<'_>,
    req: &pb::AddAuthorizedKeysRequest,
) -> Result<(), CallError> {
    let mut args = json!({ "username": req.user, "keys": req.keys });
    if req.reset {
        args["reset"] = json!(true);
    }
    t.call("guest-ssh-add-authorized-keys", Some(args))
        .await
        .map(drop)
}

/// guest-ssh-remove-authorized-keys.
pub(crate) async fn remove_keys(
    t: &Target<'_>,
    req: &pb::RemoveAuthorizedKeysRequest,
) -> Result<(), CallError> {
    let args = json!({ "username": req.user, "keys": req.keys });
    t.call("guest-ssh-remove-authorized-keys", Some(args))
        .await
        .map(drop)
}
