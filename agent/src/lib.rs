//! The envoy: the Vigo agent on every machine. `envoy store …` opens the
//! store directly, or goes through the daemon's control socket while
//! `envoy run` owns the store. See ARCHITECTURE.md ("agent").

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod record;
mod store_cmd;
pub mod sys;
pub mod tls;
