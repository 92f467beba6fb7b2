//! Property and limit tests of the framing parser: no input panics it,
//! splitting input anywhere gives the same messages, and memory stays
//! bounded.

use proptest::prelude::*;
use qvirt_qga::lexer::MAX_TOKEN_SIZE;
use qvirt_qga::stream::{MAX_NESTING, MAX_TOKEN_COUNT};
use qvirt_qga::{Message, StreamParser, writer::to_json};

fn render(messages: Vec<Message>) -> Vec<Result<Vec<u8>, String>> {
    messages
        .into_iter()
        .map(|m| m.map(|v| to_json(&v)).map_err(|e| e.desc))
        .collect()
}

fn json_ish() -> impl Strategy<Value = Vec<u8>> {
    let atoms = prop::sample::select(vec![
        &b"{"[..],
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b"'a'",
        b"\"b\\u0041\"",
        b"1",
        b"-2.5e3",
        b"true",
        b"nul",
        b" ",
        b"\n",
        b"\xff",
        b"\x00",
        b"TRUE",
        b"\"\xc3\xa9\"",
        b"\"\\ud800\"",
        b"{'execute':'guest-ping'}",
        b"'",
        b"\"",
        b"\\",
        b"0",
        b"%",
    ]);
    prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn test_no_input_panics(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut p = StreamParser::new();
        let _ = p.feed_collect(&data);
    }

    #[test]
    fn test_split_anywhere_same_messages(data in json_ish(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let mut whole = StreamParser::new();
        let want = render(whole.feed_collect(&data));
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        let mut split = StreamParser::new();
        let mut got = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain(std::iter::once(data.len())) {
            got.extend(render(split.feed_collect(&data[last..p])));
            last = p;
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn test_byte_at_a_time_same_messages(data in json_ish()) {
        let want = render(StreamParser::new().feed_collect(&data));
        let mut p = StreamParser::new();
        let mut got = Vec::new();
        for b in &data {
            got.extend(render(p.feed_collect(std::slice::from_ref(b))));
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn test_0xff_always_resynchronises(junk in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut p = StreamParser::new();
        let _ = p.feed_collect(&junk);
        let _ = p.feed_collect(b"\xff");
        prop_assert!(p.pending_bytes() == 0);
        let got = render(p.feed_collect(b"{'execute':'guest-ping'}"));
        prop_assert_eq!(got, vec![Ok(b"{\"execute\": \"guest-ping\"}".to_vec())]);
    }
}

#[test]
fn test_nesting_limit_at_boundary() {
    let depth = MAX_NESTING as usize;
    let ok = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let got = render(StreamParser::new().feed_collect(ok.as_bytes()));
    assert_eq!(got.len(), 1);
    assert!(got[0].is_ok());
    let bad = format!("{}{}", "[".repeat(depth + 1), "]".repeat(depth + 1));
    let got = render(StreamParser::new().feed_collect(bad.as_bytes()));
    assert_eq!(got[0], Err("JSON nesting depth limit exceeded".to_owned()));
}

#[test]
fn test_token_count_limit_at_boundary() {
    // "[" + n-1 items "1," ... "1" + "]": 2n tokens.
    let message = |tokens: usize| {
        let items = (tokens - 2).div_ceil(2);
        let mut s = String::with_capacity(tokens * 2);
        s.push('[');
        for i in 0..items {
            if i > 0 {
                s.push(',');
            }
            s.push('1');
        }
        s.push(']');
        s
    };
    let ok = message(MAX_TOKEN_COUNT - 1);
    let got = render(StreamParser::new().feed_collect(ok.as_bytes()));
    assert!(
        got.len() == 1 && got[0].is_ok(),
        "{:?}",
        got.first().map(|r| r.is_ok())
    );
    let bad = message(MAX_TOKEN_COUNT + 2);
    let got = render(StreamParser::new().feed_collect(bad.as_bytes()));
    assert_eq!(got[0], Err("JSON token count limit exceeded".to_owned()));
}

#[test]
fn test_token_size_limit_and_memory_bound() {
    let limit = 64 << 20;
    let mut p = StreamParser::new();
    let mut big = Vec::with_capacity(limit + 16);
    big.push(b'"');
    big.resize(limit - 1, b'a');
    big.push(b'"');
    big.push(b'\n');
    let got = render(p.feed_collect(&big));
    assert_eq!(got, vec![Err("JSON token size limit exceeded".to_owned())]);
    assert!(p.pending_bytes() < 1024);
    // One byte smaller fits.
    let mut ok = Vec::with_capacity(limit);
    ok.push(b'"');
    ok.resize(limit - 2, b'a');
    ok.push(b'"');
    let got = p.feed_collect(&ok);
    assert!(got.len() == 1 && got[0].is_ok());
    // A string that never ends is cut at the limit and memory is released.
    let mut endless = vec![b'"'];
    endless.resize(limit + 10, b'a');
    let got = render(p.feed_collect(&endless));
    assert_eq!(got[0], Err("JSON token size limit exceeded".to_owned()));
    assert!(p.pending_bytes() < 1024);
}

/// A unit of input that is repeated: json-ish atoms mixed with atoms that
/// only open (deep nesting) or only add tokens to an open container.
fn repeated_unit() -> impl Strategy<Value = Vec<u8>> {
    let atoms = prop::sample::select(vec![
        &b"["[..],
        b"{'k':",
        b"[1,",
        b"1,",
        b"'abc',",
        b"{",
        b"}",
        b"]",
        b"'",
        b"\"",
        b" ",
        b"\xff",
        b"{'execute':'guest-ping'}",
        b"truefalse",
        b"\"\\u0041",
    ]);
    prop::collection::vec(atoms, 1..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Megabytes of one unit repeated (an endless array, endless nesting,
    /// an endless string, garbage), fed in 64 KiB reads as the agent does:
    /// the message in progress never holds more than QEMU's limits allow
    /// (2,097,152 tokens, 64 MiB of token text plus one partial token), and
    /// input made only of opening brackets is cut at the nesting limit.
    #[test]
    fn test_repeated_input_keeps_pending_bounded(
        prefix in json_ish(),
        unit in repeated_unit(),
        total in (1usize << 20)..(6usize << 20),
    ) {
        let mut data = prefix;
        while data.len() < total {
            data.extend_from_slice(&unit);
        }
        let mut p = StreamParser::new();
        let mut max_tokens = 0;
        for chunk in data.chunks(64 << 10) {
            let _ = p.feed_collect(chunk);
            max_tokens = max_tokens.max(p.pending_tokens());
            prop_assert!(p.pending_tokens() <= MAX_TOKEN_COUNT);
            prop_assert!(p.pending_bytes() <= 2 * MAX_TOKEN_SIZE + 1);
        }
        if unit.iter().all(|&b| b == b'[') {
            prop_assert!(max_tokens <= MAX_NESTING as usize + 1);
        }
        // After a 0xFF the stream is clean again, whatever came before.
        let _ = p.feed_collect(b"\xff");
        prop_assert_eq!(p.pending_bytes(), 0);
        prop_assert_eq!(p.pending_tokens(), 0);
    }
}

/// The endless array: "[1,1,1,..." past the token limit is cut there
/// (the error, then the rest starts a new message), so the tokens held
/// never exceed the limit.
#[test]
fn test_endless_array_is_cut_at_the_token_limit() {
    let mut p = StreamParser::new();
    p.feed_collect(b"[");
    let mut errors = Vec::new();
    let mut max_tokens = 0;
    let chunk = b"1,".repeat(32 << 10);
    for _ in 0..80 {
        errors.extend(render(p.feed_collect(&chunk)));
        max_tokens = max_tokens.max(p.pending_tokens());
    }
    assert!(max_tokens <= MAX_TOKEN_COUNT);
    assert_eq!(
        errors.first(),
        Some(&Err("JSON token count limit exceeded".to_owned()))
    );
}
