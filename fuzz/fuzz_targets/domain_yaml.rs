//! A domain definition in YAML (what Define takes from a client and the
//! supervisor reads back from its state dir): parsing is bounded and never
//! panics, and a definition that passes the checks is stable: written out
//! and read back, it normalizes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qvirt_proto::v1::DomainSpec;
use qvirt_supervisor::config::DefaultAccel;
use qvirt_supervisor::domain::spec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = DomainSpec::from_yaml(text) else {
        return;
    };
    let Ok(normalized) = spec::normalize(parsed, DefaultAccel::Tcg) else {
        return;
    };
    let yaml = normalized.to_yaml().expect("a normalized spec writes out");
    let again = DomainSpec::from_yaml(&yaml).expect("a written spec reads back");
    let again = spec::normalize(again, DefaultAccel::Tcg).expect("and passes again");
    assert_eq!(normalized, again);
});
