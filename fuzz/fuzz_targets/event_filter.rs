//! The monitor-event name filter (a subscriber's pattern and flags): a
//! pattern compiles or is refused, never panics, and matching is total. A
//! literal filter without flags matches exactly its own name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qvirt_eventbus::filter::{EventNameFilter, FilterFlags};

fuzz_target!(|data: &[u8]| {
    let [bits, rest @ ..] = data else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (pattern, name) = text.split_once('\n').unwrap_or((&text, "STOP"));
    let Ok(flags) = FilterFlags::from_bits(u32::from(*bits % 4)) else {
        return;
    };
    let Ok(filter) = EventNameFilter::new(pattern, flags) else {
        return;
    };
    let matched = filter.matches(name);
    if flags.bits() == 0 && !pattern.is_empty() {
        assert_eq!(matched, pattern == name, "literal {pattern:?} vs {name:?}");
    }
    if pattern.is_empty() {
        assert!(matched, "an empty pattern matches every name");
    }
});
