//! Subscription filters: by event name, as libvirt's
//! `virConnectDomainQemuMonitorEventRegister` (`virsh qemu-monitor-event
//! --event/--regex/--nocase`), and by domain (name or uuid).
//!
//! - An empty event-name filter matches every event.
//! - Without [`FilterFlags::regex`], the filter is a literal compared to the
//!   whole name (`STREQ`); with [`FilterFlags::nocase`] the comparison is
//!   ASCII case-insensitive (`STRCASEEQ`).
//! - With [`FilterFlags::regex`], the filter is a regular expression that may
//!   match anywhere in the name (`regexec` without anchors); `nocase` makes it
//!   case-insensitive. The `regex` crate runs in time linear in the name, and
//!   the compiled program is capped ([`REGEX_SIZE_LIMIT`],
//!   [`REGEX_DFA_SIZE_LIMIT`]) as is the pattern ([`MAX_PATTERN_LEN`]), so no
//!   filter can hang the bus or make it hold much memory.
//!
//! Both filters are cheap to clone (a compiled regex is shared).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use regex_automata::meta::{self, Regex};
use regex_automata::util::syntax;

/// The longest event-name filter accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;

/// The most memory a compiled event-name regex (its NFA) may take, in
/// bytes. Past it, [`FilterError::RegexTooBig`].
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// The most memory the lazy DFA cache of one regex may take, in bytes. Past
/// it the engine slows down, but stays linear; it never grows further.
pub const REGEX_DFA_SIZE_LIMIT: usize = 64 * 1024;

/// How deeply groups and repetitions may nest in an event-name regex.
pub const REGEX_NEST_LIMIT: u32 = 64;

/// Why a filter was refused. The service answers `INVALID_ARGUMENT` with the
/// whole error chain (the regex parser's message is the source).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The pattern is longer than [`MAX_PATTERN_LEN`].
    #[error("event-name filter is {len} bytes long, over the limit of {max} bytes")]
    PatternTooLong {
        /// Length of the refused pattern, in bytes.
        len: usize,
        /// [`MAX_PATTERN_LEN`].
        max: usize,
    },
    /// The pattern is not a valid regular expression.
    #[error("invalid event-name regex")]
    InvalidRegex(#[source] RegexSyntaxError),
    /// The regular expression compiles to more than [`REGEX_SIZE_LIMIT`].
    #[error("event-name regex is too big once compiled (limit {limit} bytes)")]
    RegexTooBig {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// Flag bits this bus does not know (libvirt refuses them the same way).
    #[error("unknown event filter flags {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u32,
    },
}

/// How an event-name filter is interpreted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FilterFlags {
    /// The filter is a regular expression matched anywhere in the name.
    pub regex: bool,
    /// Compare case-insensitively.
    pub nocase: bool,
}

impl FilterFlags {
    /// libvirt's `VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX`.
    pub const REGEX_BIT: u32 = 1 << 0;
    /// libvirt's `VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_NOCASE`.
    pub const NOCASE_BIT: u32 = 1 << 1;

    /// Flags from libvirt's bit values; unknown bits are an error.
    pub fn from_bits(bits: u32) -> Result<Self, FilterError> {
        let unknown = bits & !(Self::REGEX_BIT | Self::NOCASE_BIT);
        if unknown != 0 {
            return Err(FilterError::UnknownFlags { bits: unknown });
        }
        Ok(FilterFlags {
            regex: bits & Self::REGEX_BIT != 0,
            nocase: bits & Self::NOCASE_BIT != 0,
        })
    }

    /// The flags as libvirt's bit values.
    pub fn bits(self) -> u32 {
        (if self.regex { Self::REGEX_BIT } else { 0 })
            | (if self.nocase { Self::NOCASE_BIT } else { 0 })
    }
}

#[derive(Debug, Clone)]
enum NameMatcher {
    All,
    Exact(Box<str>),
    ExactNoCase(Box<str>),
    Regex(Arc<Regex>),
}

/// A compiled regex takes tens of KiB (the `regex` crate builds several
/// engines), so identical regex filters share one: the duplicate
/// subscriptions the seed warns about then cost no compiled memory. Keyed by
/// pattern and `nocase`; entries die with their last filter.
type RegexKey = (Box<str>, bool);

static REGEX_CACHE: LazyLock<Mutex<HashMap<RegexKey, Weak<Regex>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn regex_cache() -> std::sync::MutexGuard<'static, HashMap<RegexKey, Weak<Regex>>> {
    REGEX_CACHE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The compiled regex for `pattern`, shared with every live filter that has
/// the same pattern and `nocase`.
fn shared_regex(pattern: &str, nocase: bool) -> Result<Arc<Regex>, FilterError> {
    let key: RegexKey = (pattern.into(), nocase);
    if let Some(re) = regex_cache().get(&key).and_then(Weak::upgrade) {
        return Ok(re);
    }
    // Compiled outside the lock; a concurrent twin just wins the race.
    let re = build_regex(pattern, nocase)?;
    let mut cache = regex_cache();
    if let Some(twin) = cache.get(&key).and_then(Weak::upgrade) {
        return Ok(twin);
    }
    let re = Arc::new(re);
    cache.insert(key, Arc::downgrade(&re));
    // Forget dead entries once they could outnumber the live ones.
    if cache.len() >= 64 && cache.len().is_power_of_two() {
        cache.retain(|_, weak| weak.strong_count() > 0);
        cache.shrink_to_fit();
    }
    Ok(re)
}

/// Compiles an event-name regex with `regex`'s syntax and semantics, but
/// only the engines an `is_match` on a short name needs: the lazy DFA
/// (linear, its cache capped) with the PikeVM behind it. The full DFA,
/// one-pass DFA and backtracker the `regex` crate would also build are left
/// out: they do not speed up such searches and made each compiled filter
/// about three times bigger (30 KiB against 9 KiB in the bench).
fn build_regex(pattern: &str, nocase: bool) -> Result<Regex, FilterError> {
    meta::Builder::new()
        .configure(
            meta::Config::new()
                .nfa_size_limit(Some(REGEX_SIZE_LIMIT))
                .hybrid_cache_capacity(REGEX_DFA_SIZE_LIMIT)
                .dfa(false)
                .onepass(false)
                .backtrack(false),
        )
        .syntax(
            syntax::Config::new()
                .case_insensitive(nocase)
                .nest_limit(REGEX_NEST_LIMIT),
        )
        .build(pattern)
        .map_err(|e| {
            if let Some(limit) = e.size_limit() {
                FilterError::RegexTooBig { limit }
            } else {
                let message = e
                    .syntax_error()
                    .map_or_else(|| e.to_string(), ToString::to_string);
                FilterError::InvalidRegex(RegexSyntaxError(message))
            }
        })
}

/// The regex parser's message, as the source of
/// [`FilterError::InvalidRegex`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RegexSyntaxError(String);

/// An event-name filter (see the module docs for the semantics).
#[derive(Debug, Clone)]
pub struct EventNameFilter {
    matcher: NameMatcher,
}

impl Default for EventNameFilter {
    fn default() -> Self {
        Self::all()
    }
}

impl EventNameFilter {
    /// The filter that matches every event name.
    pub fn all() -> Self {
        EventNameFilter {
            matcher: NameMatcher::All,
        }
    }

    /// Builds a filter from `pattern` and `flags`. An empty pattern matches
    /// every name whatever the flags.
    pub fn new(pattern: &str, flags: FilterFlags) -> Result<Self, FilterError> {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(FilterError::PatternTooLong {
                len: pattern.len(),
                max: MAX_PATTERN_LEN,
            });
        }
        let matcher = if pattern.is_empty() {
            NameMatcher::All
        } else if flags.regex {
            let re = shared_regex(pattern, flags.nocase)?;
            NameMatcher::Regex(re)
        } else if flags.nocase {
            NameMatcher::ExactNoCase(pattern.into())
        } else {
            NameMatcher::Exact(pattern.into())
        };
        Ok(EventNameFilter { matcher })
    }

    /// Whether the filter matches every name.
    pub fn is_all(&self) -> bool {
        matches!(self.matcher, NameMatcher::All)
    }

    /// The one name the filter accepts, when it is a case-sensitive
    /// literal: the hub indexes such subscribers by that name.
    pub fn exact_name(&self) -> Option<&str> {
        match &self.matcher {
            NameMatcher::Exact(want) => Some(want),
            _ => None,
        }
    }

    /// Whether `name` passes the filter.
    pub fn matches(&self, name: &str) -> bool {
        match &self.matcher {
            NameMatcher::All => true,
            NameMatcher::Exact(want) => name == &**want,
            NameMatcher::ExactNoCase(want) => name.eq_ignore_ascii_case(want),
            NameMatcher::Regex(re) => re.is_match(name),
        }
    }
}

/// A domain filter: empty matches every domain; otherwise a domain matches
/// when its name equals the spec or, when the spec is a uuid (32 hex digits,
/// dashes allowed anywhere as libvirt's `virUUIDParse` does), its uuid equals
/// the spec ignoring case and dashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainFilter {
    spec: Option<DomainSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DomainSpec {
    name: Box<str>,
    uuid: Option<[u8; 32]>,
}

/// The 32 lowercase hex digits of a uuid string, or `None` when `s` is not a
/// uuid (dashes are skipped, any other character refuses it).
fn uuid_digits(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let mut n = 0;
    for b in s.bytes() {
        if b == b'-' {
            continue;
        }
        if !b.is_ascii_hexdigit() || n == out.len() {
            return None;
        }
        out[n] = b.to_ascii_lowercase();
        n += 1;
    }
    (n == out.len()).then_some(out)
}

impl DomainFilter {
    /// The filter that matches every domain.
    pub fn all() -> Self {
        DomainFilter { spec: None }
    }

    /// A filter for the domain named `spec` or whose uuid is `spec`; an empty
    /// `spec` matches every domain.
    pub fn new(spec: &str) -> Self {
        if spec.is_empty() {
            return Self::all();
        }
        DomainFilter {
            spec: Some(DomainSpec {
                name: spec.into(),
                uuid: uuid_digits(spec),
            }),
        }
    }

    /// Whether the filter matches every domain.
    pub fn is_all(&self) -> bool {
        self.spec.is_none()
    }

    /// Whether the domain `name` / `uuid` passes the filter.
    pub fn matches(&self, name: &str, uuid: &str) -> bool {
        match &self.spec {
            None => true,
            Some(spec) => {
                &*spec.name == name || (spec.uuid.is_some() && spec.uuid == uuid_digits(uuid))
            }
        }
    }
}

/// A monitor-event subscription's whole filter: domain and event name.
#[derive(Debug, Clone, Default)]
pub struct MonitorEventFilter {
    /// Which domains.
    pub domain: DomainFilter,
    /// Which event names.
    pub event: EventNameFilter,
}

impl MonitorEventFilter {
    /// Whether an event named `event` from domain `name` / `uuid` passes.
    pub fn matches(&self, name: &str, uuid: &str, event: &str) -> bool {
        self.domain.matches(name, uuid) && self.event.matches(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIT: FilterFlags = FilterFlags {
        regex: false,
        nocase: false,
    };
    const LIT_NOCASE: FilterFlags = FilterFlags {
        regex: false,
        nocase: true,
    };
    const RE: FilterFlags = FilterFlags {
        regex: true,
        nocase: false,
    };
    const RE_NOCASE: FilterFlags = FilterFlags {
        regex: true,
        nocase: true,
    };

    #[test]
    fn test_event_name_filter_table() {
        // (pattern, flags, name, expected)
        let table: &[(&str, FilterFlags, &str, bool)] = &[
            ("", LIT, "STOP", true),
            ("", LIT, "", true),
            ("", RE_NOCASE, "anything", true),
            ("STOP", LIT, "STOP", true),
            ("STOP", LIT, "stop", false),
            ("STOP", LIT, "STOPPED", false),
            ("STOP", LIT, "XSTOP", false),
            ("STOP", LIT_NOCASE, "stop", true),
            ("stop", LIT_NOCASE, "StOp", true),
            ("STOP", LIT_NOCASE, "STOPPED", false),
            // STRCASEEQ folds ASCII only.
            ("É", LIT_NOCASE, "é", false),
            // A literal is never a regex.
            ("ST.P", LIT, "STOP", false),
            ("ST.P", LIT, "ST.P", true),
            ("(", LIT, "(", true),
            // Regex: anywhere in the name, unanchored unless asked.
            ("STOP", RE, "STOP", true),
            ("STOP", RE, "XSTOPX", true),
            ("STOP", RE, "stop", false),
            ("STOP", RE_NOCASE, "xstopx", true),
            ("^BLOCK_", RE, "BLOCK_JOB_COMPLETED", true),
            ("^BLOCK_", RE, "X_BLOCK_JOB", false),
            ("_COMPLETED$", RE, "BLOCK_JOB_COMPLETED", true),
            ("^(STOP|RESUME)$", RE, "RESUME", true),
            ("^(STOP|RESUME)$", RE, "RESUMED", false),
            ("^(stop|resume)$", RE_NOCASE, "RESUME", true),
            ("ST.P", RE, "STOP", true),
            // Realistic filters fit the size limit, Unicode classes included.
            (r"^\w+$", RE_NOCASE, "BLOCK_JOB_READY", true),
            (r"(?i)^block_job_\w+$", RE, "BLOCK_JOB_READY", true),
            (r"\p{L}+_\d+", RE_NOCASE, "xx_12", true),
            ("[[:alpha:]_]+", RE, "STOP", true),
            (".*", RE, "", true),
            (
                "^(STOP|RESUME|SHUTDOWN|RESET|POWERDOWN|SUSPEND|WAKEUP|GUEST_PANICKED)$",
                RE_NOCASE,
                "guest_panicked",
                true,
            ),
        ];
        for &(pattern, flags, name, expected) in table {
            let f = EventNameFilter::new(pattern, flags)
                .unwrap_or_else(|e| panic!("{pattern:?} {flags:?}: {e}"));
            assert_eq!(
                f.matches(name),
                expected,
                "pattern {pattern:?} flags {flags:?} name {name:?}"
            );
        }
    }

    #[test]
    fn test_invalid_regex_carries_parser_message() {
        for pattern in ["(", "[a-", "a{2,1}", "*x"] {
            let err = EventNameFilter::new(pattern, RE).expect_err(pattern);
            let FilterError::InvalidRegex(source) = &err else {
                panic!("{pattern:?}: unexpected {err:?}");
            };
            // The parser's message is reachable as the source for the status.
            let shown = std::error::Error::source(&err).map(ToString::to_string);
            assert_eq!(shown, Some(source.to_string()));
            // The same message the `regex` crate's parser gives.
            let reference = regex::Regex::new(pattern).expect_err(pattern).to_string();
            assert!(
                reference.contains(&source.to_string()),
                "{source} / {reference}"
            );
            // The same text as a literal is fine.
            assert!(EventNameFilter::new(pattern, LIT).is_ok());
        }
    }

    #[test]
    fn test_oversized_regex_is_refused() {
        // Small pattern, huge program: counted repetition of a Unicode class.
        let err = EventNameFilter::new(r"\w{1000}\w{1000}", RE).expect_err("too big");
        assert!(
            matches!(err, FilterError::RegexTooBig { limit } if limit == REGEX_SIZE_LIMIT),
            "{err:?}"
        );
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        let err = EventNameFilter::new(&long, LIT).expect_err("too long");
        assert!(matches!(err, FilterError::PatternTooLong { .. }), "{err:?}");
        let nested = format!("{}a{}", "(".repeat(200), ")".repeat(200));
        assert!(EventNameFilter::new(&nested, RE).is_err());
    }

    #[test]
    fn test_pathological_regex_on_long_name_finishes() {
        // A backtracking engine would need about 2^100000 steps here: the
        // test would never end, and nextest's terminate-after (see
        // .config/nextest.toml) fails it. No timing assertion: a linear
        // engine finishes at once whatever the machine is doing.
        let f = EventNameFilter::new("(a+)+$", RE).expect("valid");
        let name = format!("{}!", "a".repeat(100_000));
        assert!(!f.matches(&name));
        let g = EventNameFilter::new("(a|aa)*b", RE_NOCASE).expect("valid");
        assert!(!g.matches(&name));
        assert!(f.matches(&"a".repeat(100_000)));
    }

    #[test]
    fn test_identical_regex_filters_share_one_compiled_regex() {
        let pattern = "^SHARED_(A|B)$";
        let a = EventNameFilter::new(pattern, RE).expect("valid");
        let b = EventNameFilter::new(pattern, RE).expect("valid");
        let c = EventNameFilter::new(pattern, RE_NOCASE).expect("valid");
        let (NameMatcher::Regex(ra), NameMatcher::Regex(rb), NameMatcher::Regex(rc)) =
            (&a.matcher, &b.matcher, &c.matcher)
        else {
            panic!("regex matchers expected");
        };
        assert!(Arc::ptr_eq(ra, rb));
        assert!(!Arc::ptr_eq(ra, rc));
        assert!(b.matches("SHARED_B") && !b.matches("shared_b") && c.matches("shared_b"));
        drop((a, b, c));
        // Once all are gone, the next one compiles afresh.
        let d = EventNameFilter::new(pattern, RE).expect("valid");
        assert!(d.matches("SHARED_A"));
    }

    #[test]
    fn test_flags_bits() {
        assert_eq!(FilterFlags::from_bits(0).expect("0"), LIT);
        assert_eq!(FilterFlags::from_bits(1).expect("1"), RE);
        assert_eq!(FilterFlags::from_bits(2).expect("2"), LIT_NOCASE);
        assert_eq!(FilterFlags::from_bits(3).expect("3"), RE_NOCASE);
        for f in [LIT, RE, LIT_NOCASE, RE_NOCASE] {
            assert_eq!(FilterFlags::from_bits(f.bits()).expect("round trip"), f);
        }
        assert!(matches!(
            FilterFlags::from_bits(4 | 1),
            Err(FilterError::UnknownFlags { bits: 4 })
        ));
    }

    #[test]
    fn test_domain_filter_table() {
        let uuid = "c7a5fdbd-cdaf-9455-926a-d65c16db1809";
        // (spec, name, uuid, expected)
        let table: &[(&str, &str, &str, bool)] = &[
            ("", "vm1", uuid, true),
            ("vm1", "vm1", uuid, true),
            ("vm1", "vm2", uuid, false),
            ("VM1", "vm1", uuid, false),
            (uuid, "vm1", uuid, true),
            ("C7A5FDBD-CDAF-9455-926A-D65C16DB1809", "vm1", uuid, true),
            ("c7a5fdbdcdaf9455926ad65c16db1809", "vm1", uuid, true),
            (uuid, "vm1", "00000000-0000-0000-0000-000000000000", false),
            // A name that looks like a uuid still matches by name.
            (uuid, uuid, "00000000-0000-0000-0000-000000000000", true),
            // Not a uuid: 31 digits, or stray characters.
            ("c7a5fdbdcdaf9455926ad65c16db180", "vm1", uuid, false),
            ("c7a5fdbd cdaf9455926ad65c16db1809", "vm1", uuid, false),
        ];
        for &(spec, name, id, expected) in table {
            let f = DomainFilter::new(spec);
            assert_eq!(f.matches(name, id), expected, "spec {spec:?} {name} {id}");
        }
        assert!(DomainFilter::new("").is_all());
        assert!(!DomainFilter::new("x").is_all());
    }

    #[test]
    fn test_monitor_event_filter_needs_both() {
        let f = MonitorEventFilter {
            domain: DomainFilter::new("vm1"),
            event: EventNameFilter::new("STOP", LIT).expect("valid"),
        };
        assert!(f.matches("vm1", "", "STOP"));
        assert!(!f.matches("vm2", "", "STOP"));
        assert!(!f.matches("vm1", "", "RESUME"));
        assert!(MonitorEventFilter::default().matches("any", "", "ANY"));
    }

    proptest! {
        #[test]
        fn prop_literal_never_errors_and_matches_only_equal(
            pattern in "\\PC{0,40}",
            name in "\\PC{0,40}",
        ) {
            let f = EventNameFilter::new(&pattern, LIT).expect("literal never errors");
            prop_assert!(f.matches(&pattern));
            prop_assert_eq!(f.matches(&name), pattern.is_empty() || name == pattern);
        }

        #[test]
        fn prop_literal_nocase_is_ascii_case_insensitive_equality(
            pattern in "[a-zA-Z_]{1,12}",
            name in "[a-zA-Z_]{0,12}",
        ) {
            let f = EventNameFilter::new(&pattern, LIT_NOCASE).expect("valid");
            prop_assert!(f.matches(&pattern.to_ascii_lowercase()));
            prop_assert!(f.matches(&pattern.to_ascii_uppercase()));
            prop_assert_eq!(
                f.matches(&name),
                // An oracle independent of `eq_ignore_ascii_case`.
                name.bytes()
                    .map(|b| b.to_ascii_lowercase())
                    .eq(pattern.bytes().map(|b| b.to_ascii_lowercase()))
            );
        }

        #[test]
        fn prop_escaped_regex_matches_substring(
            needle in "\\PC{1,10}",
            prefix in "\\PC{0,10}",
            suffix in "\\PC{0,10}",
        ) {
            let f = EventNameFilter::new(&regex::escape(&needle), RE).expect("escaped is valid");
            let name = format!("{prefix}{needle}{suffix}");
            prop_assert!(f.matches(&name));
            prop_assert_eq!(f.matches(&prefix), prefix.contains(needle.as_str()));
        }

        #[test]
        fn prop_any_regex_pattern_never_panics(pattern in "\\PC{0,64}", name in "\\PC{0,64}") {
            if let Ok(f) = EventNameFilter::new(&pattern, RE_NOCASE) {
                let _ = f.matches(&name);
            }
        }

        /// Our trimmed engine set answers as the `regex` crate does.
        #[test]
        fn prop_regex_agrees_with_regex_crate(
            pattern in "[A-Za-z_.*+?^$|()\\[\\]-]{1,16}",
            name in "[A-Za-z_]{0,24}",
            nocase in any::<bool>(),
        ) {
            let reference = regex::RegexBuilder::new(&pattern).case_insensitive(nocase).build();
            let flags = FilterFlags { regex: true, nocase };
            match (EventNameFilter::new(&pattern, flags), reference) {
                (Ok(f), Ok(r)) => prop_assert_eq!(f.matches(&name), r.is_match(&name)),
                (Err(_), Err(_)) => {}
                (ours, theirs) => prop_assert!(false, "{:?} vs {:?}", ours.err(), theirs.err()),
            }
        }
    }
}
