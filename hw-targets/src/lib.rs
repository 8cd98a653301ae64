//! The target matrix (issue 4): builds the workspace for every target the
//! fleet runs on, runs what can run here (natively, under qemu-user, with
//! io_uring refused), measures ingest, and reports one table (or JSON).
//!
//! - `targets`: the targets and what each needs installed;
//! - `setup`: installing that, idempotently (apt, rustup);
//! - `matrix`: building, running, measuring, per row;
//! - `testlog`: reading libtest's output;
//! - `report`: rows, the table and the JSON;
//! - `sys`: platform code (seccomp, the io_uring sysctl), Linux only.
//!
//! `vigo-noring` (src/bin) is the seccomp wrapper the refusal rows run under.
#![deny(unsafe_code)]

pub mod matrix;
pub mod report;
pub mod setup;
#[allow(unsafe_code)] // reason: signal handlers around the system-wide io_uring switch
pub mod sys;
pub mod targets;
pub mod testlog;
