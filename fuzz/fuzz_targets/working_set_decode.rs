//! `WorkingSet::decode` and `WorkingSet::order_in` on arbitrary bytes: a working set comes
//! from the registry, written by anyone with push on the snapshot's repository.
//!
//! Properties of every accepted list:
//! - it is canonical: `encode` gives back exactly the bytes decoded;
//! - it holds at most `entry_count` indexes and is no longer than `WorkingSet::max_len`;
//! - checked against a recipe of `entry_count` entries (when that is at most 4,096; every
//!   third entry a zero run), `order_in` refuses it exactly when an index is past the end or
//!   names a zero run, and otherwise answers each index once, in first-occurrence order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw_schema::recipe::RecipeBuilder;
use thaw_schema::working_set::WorkingSet;
use thaw_schema::{ChunkId, ChunkerParams, RecipeEntry};

fuzz_target!(|data: &[u8]| {
    let Ok(set) = WorkingSet::decode(data) else { return };
    assert_eq!(set.encode(), data, "decode is not canonical: encode(decode(x)) != x");
    assert!(set.order.len() <= set.entry_count as usize);
    assert!(data.len() as u64 <= WorkingSet::max_len(set.entry_count as usize));

    if set.entry_count > 4096 {
        return;
    }
    let mut b = RecipeBuilder::new(ChunkerParams::fixed(4096));
    for i in 0..set.entry_count {
        if i % 3 == 1 {
            b.push_zero(4096);
        } else {
            b.push_data(4096, ChunkId::of(&i.to_le_bytes()));
        }
    }
    let recipe = b.finish(set.memory);
    let valid = set.order.iter().all(|&i| i < set.entry_count && i % 3 != 1);
    match set.order_in(&recipe) {
        Ok(order) => {
            assert!(valid, "an index past the end or on a zero run was accepted");
            let mut expected: Vec<usize> = Vec::new();
            for &i in &set.order {
                if !expected.contains(&(i as usize)) {
                    expected.push(i as usize);
                }
            }
            assert_eq!(order, expected);
            assert!(order.iter().all(|&i| matches!(recipe.entries[i], RecipeEntry::Data { .. })));
        }
        Err(e) => assert!(!valid, "a valid working set was refused: {e}"),
    }
});
