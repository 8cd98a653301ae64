//! Many BLAKE3 hashes at once, one SIMD lane per message.
//!
//! `blake3::hash` of one 8–32 KiB chunk uses the CPU's SIMD lanes well only
//! for the first power-of-two run of 1 KiB BLAKE3 chunks; the leftover
//! chunks, the final partial chunk and the parent nodes run one or two lanes
//! wide. Measured here (AVX2, 8 lanes), hashing FastCDC chunks one by one
//! ran at ~1.3–1.7 GB/s per core against ~2.2 GB/s for one long input, and
//! chunk hashing is most of `verify` and half of `add`.
//!
//! [`hash_batch`] hashes a batch of messages the way BLAKE3 hashes one long
//! input: BLAKE3 chunk `j` of every message in the batch shares one SIMD
//! call (all of them use chunk counter `j`), and parent nodes of every
//! message at one tree level share another. Only each message's final
//! BLAKE3 chunk is compressed on its own (it may be partial). The result is
//! exactly `blake3::hash` of each message; the tests check that over many
//! lengths and batch shapes.
//!
//! This uses `blake3::platform`, which the crate marks as unstable (hidden
//! from its docs): the SIMD dispatch and `hash_many` are what `blake3::hash`
//! itself runs, but a future `blake3` release may rename them. A rename is a
//! compile error here, and any change of meaning fails the tests against
//! `blake3::hash`.

use blake3::hazmat::HasherExt;
use blake3::platform::Platform;
use blake3::{BLOCK_LEN, CHUNK_LEN, IncrementCounter, OUT_LEN};

// Domain flags of the BLAKE3 compression function (BLAKE3 spec, table 3).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
/// BLAKE3's IV: the key words of the plain (unkeyed) hash mode.
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

const _: () = assert!(
    2 * OUT_LEN == BLOCK_LEN,
    "a parent block holds two chaining values"
);

type Cv = [u8; OUT_LEN];

/// BLAKE3 chunks of a message (an empty one still has one).
fn chunk_count(len: usize) -> usize {
    len.div_ceil(CHUNK_LEN).max(1)
}

/// Writes `blake3::hash(msgs[i])` to `out[i]` for every message.
pub fn hash_batch(msgs: &[&[u8]], out: &mut [[u8; OUT_LEN]]) {
    assert_eq!(msgs.len(), out.len());
    let platform = Platform::detect();
    // A one-chunk message's chunk is its root: nothing to share.
    let mut multi: Vec<usize> = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        if m.len() <= CHUNK_LEN {
            out[i] = *blake3::hash(m).as_bytes();
        } else {
            multi.push(i);
        }
    }
    if multi.is_empty() {
        return;
    }
    // Longest first: the messages that have a full chunk `j` before their
    // final one are then a prefix of `multi`.
    multi.sort_unstable_by_key(|&i| std::cmp::Reverse(msgs[i].len()));
    let counts: Vec<usize> = multi.iter().map(|&i| chunk_count(msgs[i].len())).collect();
    let mut starts = Vec::with_capacity(multi.len());
    let mut total = 0;
    for &n in &counts {
        starts.push(total);
        total += n;
    }
    // Chaining values, message by message: those of `multi[k]` live in
    // `cvs[starts[k]..starts[k] + counts[k]]`, and shrink in place as
    // parent levels are merged.
    let mut cvs: Vec<Cv> = vec![[0; OUT_LEN]; total];
    let mut scratch: Vec<u8> = vec![0; multi.len().max(total / 2) * OUT_LEN];

    // Every full chunk but the last of each message, one SIMD call per chunk index.
    let mut inputs: Vec<&[u8; CHUNK_LEN]> = Vec::with_capacity(multi.len());
    for j in 0..counts[0] - 1 {
        let active = counts.partition_point(|&n| n > j + 1);
        inputs.clear();
        inputs.extend(multi[..active].iter().map(|&i| -> &[u8; CHUNK_LEN] {
            msgs[i][j * CHUNK_LEN..(j + 1) * CHUNK_LEN]
                .try_into()
                .expect("a full chunk")
        }));
        let produced = &mut scratch[..active * OUT_LEN];
        platform.hash_many(
            &inputs,
            &IV,
            j as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END,
            produced,
        );
        for (k, cv) in produced.chunks_exact(OUT_LEN).enumerate() {
            cvs[starts[k] + j].copy_from_slice(cv);
        }
    }
    // The final (possibly partial) chunk of each message, on its own.
    for (k, &i) in multi.iter().enumerate() {
        let last = counts[k] - 1;
        cvs[starts[k] + last] = blake3::Hasher::new()
            .set_input_offset((last * CHUNK_LEN) as u64)
            .update(&msgs[i][last * CHUNK_LEN..])
            .finalize_non_root();
    }
    // Parent levels: pair neighbours left to right, carrying an odd last one
    // up unchanged; this builds BLAKE3's tree (every left subtree a power of
    // two chunks). A message's last pair is its root.
    let mut width = counts;
    let mut live: Vec<usize> = (0..multi.len()).collect();
    while !live.is_empty() {
        for root in [false, true] {
            let members: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&k| (width[k] == 2) == root)
                .collect();
            if members.is_empty() {
                continue;
            }
            let pairs: usize = members.iter().map(|&k| width[k] / 2).sum();
            let produced = &mut scratch[..pairs * OUT_LEN];
            {
                let inputs: Vec<&[u8; BLOCK_LEN]> = members
                    .iter()
                    .flat_map(|&k| {
                        let level = &cvs[starts[k]..starts[k] + width[k]];
                        level
                            .chunks_exact(2)
                            .map(|pair| pair.as_flattened().try_into().expect("two CVs"))
                    })
                    .collect();
                let flags = PARENT | if root { ROOT } else { 0 };
                platform.hash_many(&inputs, &IV, 0, IncrementCounter::No, flags, 0, 0, produced);
            }
            let mut parents = produced.chunks_exact(OUT_LEN);
            for &k in &members {
                let (s, w) = (starts[k], width[k]);
                for q in 0..w / 2 {
                    cvs[s + q].copy_from_slice(parents.next().expect("one CV per pair"));
                }
                if w % 2 == 1 {
                    cvs[s + w / 2] = cvs[s + w - 1];
                }
                width[k] = w / 2 + w % 2;
                if root {
                    out[multi[k]] = cvs[s];
                }
            }
        }
        live.retain(|&k| width[k] > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(data: &[u8], lens: &[usize]) {
        let mut msgs = Vec::new();
        let mut at = 0;
        for &len in lens {
            let start = at % (data.len() - len + 1);
            msgs.push(&data[start..start + len]);
            at += len + 13;
        }
        let mut out = vec![[0u8; OUT_LEN]; msgs.len()];
        hash_batch(&msgs, &mut out);
        for (m, h) in msgs.iter().zip(&out) {
            assert_eq!(
                blake3::hash(m).as_bytes(),
                h,
                "message of {} bytes",
                m.len()
            );
        }
    }

    fn data() -> &'static [u8] {
        static DATA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        DATA.get_or_init(|| {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            (0..(3 << 20))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
    }

    #[test]
    fn every_length_around_block_and_chunk_edges() {
        let data = data();
        let mut lens = Vec::new();
        for chunks in [0usize, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33] {
            for delta in [-65isize, -64, -63, -1, 0, 1, 63, 64, 65] {
                let len = (chunks * CHUNK_LEN) as isize + delta;
                if len >= 0 {
                    lens.push(len as usize);
                }
            }
        }
        check(data, &lens);
        // One at a time, and the same length many times (full SIMD groups).
        for &len in &lens {
            check(data, &[len]);
        }
        check(data, &[8 * CHUNK_LEN + 5; 40]);
        check(data, &[]);
    }

    #[test]
    fn long_messages() {
        let data = data();
        check(data, &[(1 << 20) + 77, 2 << 20, 3 << 20, 5, 70_000]);
    }

    proptest! {
        #[test]
        fn matches_blake3_hash(lens in prop::collection::vec(0usize..40_000, 0..80)) {
            check(data(), &lens);
        }
    }
}
