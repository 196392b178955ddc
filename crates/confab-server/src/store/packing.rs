//! Small integers packed into bytes, for the rows that hold many entries at once (an author's
//! run of retry keys, a room's run of history index entries): LEB128 varints, and zigzag for
//! differences that may be negative.

/// Appends `value` as a LEB128 varint (7 bits a byte, the high bit set on all but the last).
pub(super) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The varint at the start of `at`, which moves past it; `None` if there is none whole.
pub(super) fn take_varint(at: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (index, &byte) in at.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            *at = &at[index + 1..];
            return Some(value);
        }
    }
    None
}

/// Maps a difference that is usually small and positive but may step back to a small
/// unsigned number (0, -1, 1, -2, ... to 0, 1, 2, 3, ...).
pub(super) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

/// The inverse of [`zigzag`].
pub(super) fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_zigzags_round_trip() {
        for value in [0i64, 1, -1, 63, -64, 64, 1 << 40, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(value));
            out.push(0x2a);
            let mut at = out.as_slice();
            assert_eq!(take_varint(&mut at).map(unzigzag), Some(value));
            assert_eq!(at, [0x2a], "the varint alone was taken");
        }
        assert_eq!(
            take_varint(&mut [0x80u8, 0x80].as_slice()),
            None,
            "cut short"
        );
    }
}
