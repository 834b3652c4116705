//! The binary missing-chunks query and its answer (docs/FORMAT.md, "Missing-chunks query").
//!
//! Modes, by the first byte:
//! - 0: the rest is a query body. Accepted → at most `MAX_IDS_PER_QUERY` ids and
//!   `encode_chunk_id_query` gives back exactly the bytes decoded.
//! - 1: the rest is an answer body, checked against the n it declares (capped at
//!   `MAX_IDS_PER_QUERY`: a real reader passes the number of ids it asked, never more).
//!   Accepted → one flag per id; re-encoding (the shorter form) decodes to the same flags,
//!   is never longer than the input, and is the input itself when the input is the form
//!   the encoder picks.
//! - otherwise: the rest is a list of flags (one bit each); `encode_missing_answer` →
//!   `decode_missing_answer` round trips, has the documented length, refuses another n and
//!   truncations.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_schema::dto::{
    decode_chunk_id_query, decode_missing_answer, encode_chunk_id_query, encode_missing_answer,
    MAX_IDS_PER_QUERY,
};

fn check_answer_round_trip(missing: &[bool]) -> Vec<u8> {
    let n = missing.len();
    let body = encode_missing_answer(missing);
    let m = missing.iter().filter(|x| **x).count();
    assert_eq!(body.len(), 13 + n.div_ceil(8).min(4 + 4 * m));
    assert_eq!(decode_missing_answer(&body, n).expect("own answer decodes"), missing);
    body
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        0 => {
            let Ok(ids) = decode_chunk_id_query(rest) else { return };
            assert!(ids.len() <= MAX_IDS_PER_QUERY);
            assert_eq!(encode_chunk_id_query(&ids), rest, "query is not canonical");
        }
        1 => {
            let Some(n) = rest.get(8..12) else { return };
            let asked = u32::from_le_bytes(n.try_into().unwrap()) as usize;
            if asked > MAX_IDS_PER_QUERY {
                return;
            }
            let Ok(missing) = decode_missing_answer(rest, asked) else { return };
            assert_eq!(missing.len(), asked);
            let body = check_answer_round_trip(&missing);
            assert!(body.len() <= rest.len(), "the encoder's form is longer than another valid one");
            if body.len() == rest.len() && body[12] == rest[12] {
                assert_eq!(body, rest, "two encodings of one answer in the same form");
            }
            if asked > 0 {
                assert!(decode_missing_answer(rest, asked - 1).is_err());
            }
            assert!(decode_missing_answer(rest, asked + 1).is_err());
        }
        _ => {
            let missing: Vec<bool> = rest.iter().flat_map(|b| (0..8).map(move |i| b >> i & 1 == 1)).collect();
            // Trim to a length the second byte picks, so every n mod 8 is reached.
            let keep = missing.len().saturating_sub(usize::from(mode % 8));
            let missing = &missing[..keep];
            let body = check_answer_round_trip(missing);
            let n = missing.len();
            if n > 0 {
                assert!(decode_missing_answer(&body, n - 1).is_err());
            }
            assert!(decode_missing_answer(&body, n + 1).is_err());
            for cut in [0, 8, 12, 13, body.len() - 1] {
                if cut < body.len() {
                    assert!(decode_missing_answer(&body[..cut], n).is_err(), "truncation at {cut} accepted");
                }
            }
        }
    }
});
