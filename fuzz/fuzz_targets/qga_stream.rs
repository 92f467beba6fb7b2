//! The qemu-ga JSON stream (what agentd reads from a guest and qvirt-ga
//! from its host): any split of the same bytes gives the same messages,
//! and nothing panics. The first byte picks the split points.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qvirt_qga::StreamParser;

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let whole = StreamParser::new().feed_collect(input);
    let mut parser = StreamParser::new();
    let mut pieces = Vec::new();
    let step = usize::from(step % 16) + 1;
    for chunk in input.chunks(step) {
        pieces.extend(parser.feed_collect(chunk));
    }
    assert_eq!(whole, pieces, "split every {step} bytes");
});
