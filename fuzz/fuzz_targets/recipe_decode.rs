//! `Recipe::decode` on arbitrary bytes.
//!
//! Random bytes almost never carry a valid BLAKE3 trailer, so the first input byte picks a
//! mode: odd = the rest is a recipe *body* and the harness appends the correct trailer (this
//! reaches the entry parser and `validate`), even = the rest is decoded as is.
//!
//! Properties of every accepted recipe:
//! - it validates (`Recipe::validate`);
//! - it is canonical: `encode` gives back exactly the bytes decoded;
//! - decoding the re-encoding gives an equal recipe;
//! - entry lengths add up to `size`, `zero_bytes` <= `size`, `entry_at` agrees with the
//!   entry boundaries, and `distinct_chunks` holds each data id once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_schema::recipe::{Recipe, RecipeEntry};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let owned;
    let bytes: &[u8] = if mode & 1 == 1 {
        let mut b = rest.to_vec();
        let check = blake3::hash(&b);
        b.extend_from_slice(check.as_bytes());
        owned = b;
        &owned
    } else {
        rest
    };
    let Ok(recipe) = Recipe::decode(bytes) else { return };

    recipe.validate().expect("a decoded recipe validates");
    let again = recipe.encode();
    assert_eq!(again, bytes, "decode is not canonical: encode(decode(x)) != x");
    assert_eq!(Recipe::decode(&again).expect("re-encoding decodes"), recipe);

    let total: u64 = recipe.entries.iter().map(|e| u64::from(e.byte_len())).sum();
    assert_eq!(total, recipe.size);
    assert!(recipe.zero_bytes() <= recipe.size);
    let mut start = 0u64;
    for (i, e) in recipe.entries.iter().enumerate() {
        assert_eq!(recipe.entry_at(start), Some((i, start)));
        let last = start + u64::from(e.byte_len()) - 1;
        assert_eq!(recipe.entry_at(last), Some((i, start)));
        start += u64::from(e.byte_len());
    }
    assert_eq!(recipe.entry_at(recipe.size), None);

    let distinct = recipe.distinct_chunks();
    let set: std::collections::HashSet<_> = distinct.iter().collect();
    assert_eq!(set.len(), distinct.len(), "distinct_chunks repeats an id");
    for e in &recipe.entries {
        if let RecipeEntry::Data { id, .. } = e {
            assert!(set.contains(id));
        }
    }
});
