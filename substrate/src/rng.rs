//! SplitMix64: the crate's only source of randomness, always seeded.
//!
//! Hand-written (eight lines) rather than `rand`'s `StdRng`/`SmallRng`
//! because `rand` documents that those generators' output may change
//! between releases: a recorded scheduler trace or simulation must replay
//! identically after a dependency upgrade. SplitMix64 (Steele, Lea, Flood
//! 2014) is the fixed, well-studied 64-bit mixer Java and xoshiro use for
//! seeding; statistical quality far beyond tie-breaking's needs.

#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `lo..=hi` (modulo bias is irrelevant here).
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sequence() {
        // Reference values of SplitMix64 seeded with 0.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }
}
