//! What the hook executor does with a script's output: the reply is cut
//! to its budget whatever the scripts printed, and libvirt's shell quoting
//! of a value reads back as the value. Sizes come from the input, so
//! megabyte outputs are tried without megabyte inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use qvirt_hookexec::run::shell_quote;
use qvirt_hookexec::service::{REPLY_BUDGET, fit_reply};
use qvirt_proto::v1::{RunHookResponse, HookScriptResult};

/// Reads a word back as a POSIX shell would: bare, or in '...' with '\''
/// for a quote.
fn unquote(word: &str) -> String {
    let Some(inner) = word.strip_prefix('\'').and_then(|w| w.strip_suffix('\'')) else {
        return word.to_owned();
    };
    inner.replace(r"'\''", "'")
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    assert_eq!(unquote(&shell_quote(&text)), text);

    let mut response = RunHookResponse::default();
    for pair in data.chunks(2).take(64) {
        let out = usize::from(pair[0]) << 14;
        let err = usize::from(*pair.get(1).unwrap_or(&0)) << 14;
        response.results.push(HookScriptResult {
            stdout: vec![b'o'; out],
            stderr: vec![b'e'; err],
            ..HookScriptResult::default()
        });
    }
    let before: Vec<(usize, usize)> = response
        .results
        .iter()
        .map(|r| (r.stdout.len(), r.stderr.len()))
        .collect();
    fit_reply(&mut response);
    assert!(response.encoded_len() <= REPLY_BUDGET + 64, "{}", response.encoded_len());
    for (r, (out, err)) in response.results.iter().zip(before) {
        assert_eq!(r.stdout_truncated, r.stdout.len() < out);
        assert_eq!(r.stderr_truncated, r.stderr.len() < err);
    }
});
