//! A run of one author's retry keys packed into one value: the `keys` column of a
//! `client_key_runs` row (see `retry_keys.rs`).
//!
//! An author's keys that grow with time (UUIDv7s, ULIDs, counters: the usual case) come to
//! be written a few dozen at a time, all above every key the author already has. One row per
//! key cost SQLite's insert work (a B-tree descent, a cell, now and then a page split) for
//! each of them; packed, the whole group is one row. Sorted keys share long prefixes (a
//! UUIDv7's timestamp, a counter's leading digits), so each key is stored as the length it
//! shares with the one before and the rest, LevelDB's way:
//!
//! ```text
//! entry := varint(shared) varint(suffix length) suffix varint(zigzag(rowid - previous rowid))
//! ```
//!
//! with `shared` 0 and the previous rowid 0 for the first entry (`packing.rs`).

use super::packing::{put_varint, take_varint, unzigzag, zigzag};

/// Packs `entries` (`client_id`, message rowid), which must be sorted by key with no key
/// twice.
pub(super) fn encode<'a>(entries: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<u8> {
    let entries = entries.into_iter();
    // About what a UUID-like key takes after the prefix it shares, with its lengths and rowid:
    // growing from empty reallocated several times per run.
    let mut out = Vec::with_capacity(entries.size_hint().0 * 24);
    let mut previous: &[u8] = &[];
    let mut previous_rowid = 0i64;
    for (key, rowid) in entries {
        let key = key.as_bytes();
        debug_assert!(previous < key || out.is_empty(), "keys ascend");
        let shared = previous.iter().zip(key).take_while(|(a, b)| a == b).count();
        put_varint(&mut out, shared as u64);
        put_varint(&mut out, (key.len() - shared) as u64);
        out.extend_from_slice(&key[shared..]);
        put_varint(&mut out, zigzag(rowid.wrapping_sub(previous_rowid)));
        previous = key;
        previous_rowid = rowid;
    }
    out
}

/// The rowid packed with `wanted` in `run`, if it is there. `None` also for a damaged run:
/// a key that cannot be read is a key not found, and the message is stored again rather than
/// refused.
pub(super) fn find(run: &[u8], wanted: &str) -> Option<i64> {
    let wanted = wanted.as_bytes();
    let mut key: Vec<u8> = Vec::with_capacity(wanted.len());
    let mut rowid = 0i64;
    let mut at = run;
    while !at.is_empty() {
        let shared = usize::try_from(take_varint(&mut at)?).ok()?;
        let length = usize::try_from(take_varint(&mut at)?).ok()?;
        if shared > key.len() || length > at.len() {
            return None;
        }
        key.truncate(shared);
        key.extend_from_slice(&at[..length]);
        at = &at[length..];
        rowid = rowid.wrapping_add(unzigzag(take_varint(&mut at)?));
        match key.as_slice().cmp(wanted) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Some(rowid),
            // Sorted: it would have come by now.
            std::cmp::Ordering::Greater => return None,
        }
    }
    None
}

/// The number of keys in `run`, for tests.
#[cfg(test)]
pub(super) fn len(run: &[u8]) -> usize {
    let mut at = run;
    let mut count = 0;
    while !at.is_empty() {
        let _shared = take_varint(&mut at).expect("shared");
        let length = take_varint(&mut at).expect("length") as usize;
        at = &at[length..];
        let _rowid = take_varint(&mut at).expect("rowid");
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_found_with_its_rowid_and_no_other() {
        let keys: Vec<String> = (0..300).map(|n| format!("run-7-{n:016x}")).collect();
        // Rowids that step back and forth, large and small.
        let rowids: Vec<i64> = (0..300i64)
            .map(|n| if n % 3 == 0 { n * 1_000_003 } else { 5 - n })
            .collect();
        let run = encode(keys.iter().map(String::as_str).zip(rowids.iter().copied()));
        assert_eq!(len(&run), 300);
        for (key, &rowid) in keys.iter().zip(&rowids) {
            assert_eq!(find(&run, key), Some(rowid), "{key}");
        }
        for absent in [
            "",
            "run-7-",
            "run-7-00000000000000005",
            "run-8",
            "s",
            "run-7-0000000000000f",
        ] {
            assert_eq!(find(&run, absent), None, "{absent:?}");
        }
    }

    #[test]
    fn shared_prefixes_keep_a_run_small() {
        // 300 counter keys of 22 bytes, their messages a few rowids apart: 6 bytes a key.
        let keys: Vec<String> = (0..300).map(|n| format!("run-7-{n:016x}")).collect();
        let run = encode(
            keys.iter()
                .map(String::as_str)
                .zip((1_000_000..).step_by(9)),
        );
        assert!(run.len() <= 300 * 6 + 22, "{} bytes", run.len());
    }

    #[test]
    fn keys_of_any_bytes_and_lengths() {
        let mut keys = ["a", "ab", "abc", "abd", "b", "é", "éa", "日本"];
        keys.sort_unstable();
        let run = encode(keys.iter().copied().zip(1..));
        for (key, rowid) in keys.iter().zip(1..) {
            assert_eq!(find(&run, key), Some(rowid));
        }
        assert_eq!(find(&run, "aa"), None);
        assert_eq!(find(&encode([]), "a"), None);
        assert_eq!(encode([("only", i64::MAX)]).len(), 1 + 1 + 4 + 10);
        assert_eq!(find(&encode([("only", i64::MIN)]), "only"), Some(i64::MIN));
    }

    #[test]
    fn a_damaged_run_finds_nothing() {
        let run = encode([("a", 1), ("b", 2)]);
        for cut in 0..run.len() {
            // Whatever is cut off, nothing panics and nothing wrong is found.
            assert!(matches!(find(&run[..cut], "b"), None | Some(2)));
        }
        assert_eq!(find(&[0xff; 12], "a"), None);
        assert_eq!(
            find(&[5, 1, b'a', 0], "a"),
            None,
            "shares more than there is"
        );
    }
}
