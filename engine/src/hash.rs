//! Content identities. Every hash in the engine is BLAKE3; the newtypes keep
//! a chunk's hash, a blob's content hash and a blob's id from being mixed up.
//!
//! A [`BlobId`] is the BLAKE3 of the manifest root (see `docs/manifest-format.md`),
//! and its text form carries the manifest format version and the hash
//! algorithm: `v1-b3-<64 lowercase hex>`, so a future format can never be
//! confused with this one.

use std::fmt;
use std::str::FromStr;

/// Length of every hash the engine stores.
pub const HASH_BYTES: usize = 32;

macro_rules! hash_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; HASH_BYTES]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; HASH_BYTES] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }
    };
}

hash_newtype!(
    /// BLAKE3 of one chunk's bytes.
    ChunkHash
);
hash_newtype!(
    /// BLAKE3 of a blob's whole content: exactly what `b3sum` prints.
    ContentHash
);
hash_newtype!(
    /// Identity of a blob: the keyed BLAKE3 of its canonical manifest root.
    BlobId
);

impl ChunkHash {
    pub fn of(bytes: &[u8]) -> Self {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Prefix of a blob id's text form: manifest format 1, hash algorithm BLAKE3.
pub const BLOB_ID_PREFIX: &str = "v1-b3-";

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{BLOB_ID_PREFIX}{}", self.to_hex())
    }
}

/// Why a string is not a blob id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobIdParseError {
    #[error("blob id must start with {BLOB_ID_PREFIX:?} (manifest format 1, BLAKE3)")]
    Prefix,
    #[error("blob id must end with 64 lowercase hex digits")]
    Digits,
}

impl FromStr for BlobId {
    type Err = BlobIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .strip_prefix(BLOB_ID_PREFIX)
            .ok_or(BlobIdParseError::Prefix)?;
        if digits.len() != 2 * HASH_BYTES || digits.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(BlobIdParseError::Digits);
        }
        let mut out = [0u8; HASH_BYTES];
        hex::decode_to_slice(digits, &mut out).map_err(|_| BlobIdParseError::Digits)?;
        Ok(BlobId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_text_round_trip() {
        let id = BlobId([0xab; 32]);
        let text = id.to_string();
        assert!(text.starts_with("v1-b3-abab"));
        assert_eq!(text.parse::<BlobId>().unwrap(), id);
        assert_eq!("v2-b3-00".parse::<BlobId>(), Err(BlobIdParseError::Prefix));
        assert_eq!("v1-b3-zz".parse::<BlobId>(), Err(BlobIdParseError::Digits));
        let upper = format!("{BLOB_ID_PREFIX}{}", "AB".repeat(32));
        assert_eq!(upper.parse::<BlobId>(), Err(BlobIdParseError::Digits));
    }
}
