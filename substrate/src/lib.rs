//! Sans-IO core of Vigo's data plane: the envoy-to-envoy wire codec, the
//! piece scheduler that fetches one blob from many peers, and the serving
//! side's per-connection limits. See ARCHITECTURE.md ("substrate") and
//! `docs/wire-format.md`.
//!
//! **Nothing here performs IO or reads a clock.** Every state machine takes
//! its inputs through `handle_*(now, …)` and hands its outputs out through
//! `poll_*`, with buffers owned by the caller (the shape of quinn-proto). The
//! async shell in `agent` owns sockets, TLS, the store and the real clock; it
//! converts `Instant`s to [`Timestamp`]s and back. That is what makes a
//! deterministic, seeded simulation of many peers on one thread possible
//! (`sim`, built for tests and behind the `sim` feature for `vigo-perf`).
//!
//! Modules:
//! - [`wire`]: frames, the streaming [`wire::Decoder`], the encoder, have-maps,
//!   and [`wire::ManifestAssembler`] (verifies a manifest part by part).
//! - [`sched`]: [`sched::Scheduler`], the download side: rarest first, runs of
//!   consecutive chunks, bounded in-flight work per peer, endgame, banning,
//!   stall detection, rate limits.
//! - [`serve`]: [`serve::Uploader`], the upload side of one connection:
//!   credit, request rate, upload rate, cancel handling.
//! - [`rate`]: [`rate::TokenBucket`], shared by both sides.
//! - [`time`]: [`Timestamp`], the only notion of time in this crate.
#![forbid(unsafe_code)]

pub mod rate;
mod rng;
pub mod sched;
pub mod serve;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod time;
pub mod wire;

pub use time::Timestamp;
