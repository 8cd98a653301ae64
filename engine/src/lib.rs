//! The Vigo blob engine. See ARCHITECTURE.md ("engine") for the map.
#![deny(unsafe_code)]

pub mod chunker;
pub mod hash;
pub mod manifest;
