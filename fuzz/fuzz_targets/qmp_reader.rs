//! The QMP monitor reader (what the supervisor reads from QEMU): lines
//! kept within the limit, longer ones skipped, every line parsed as a
//! greeting, reply or event without a panic. The first two bytes pick the
//! read buffer's size and the line limit, so the over-long path is reached
//! with small inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [chunk, limit, input @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk) + 1;
    let limit = usize::from(*limit) * 8 + 2;
    qvirt_supervisor::qmp::fuzz_monitor_stream(input, chunk, limit);
});
