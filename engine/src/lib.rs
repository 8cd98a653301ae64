//! The Vigo blob engine: content-defined chunking, BLAKE3 manifests and a
//! crash-safe blob store written through io_uring or portable positional IO.
//! It opens no sockets and knows no peers. See ARCHITECTURE.md ("engine").
#![deny(unsafe_code)]

pub mod chunker;
pub mod hash;
mod index;
mod index_file;
mod ingest;
pub mod io;
pub mod manifest;
pub mod mem;
mod partial_io;
pub mod store;
#[allow(unsafe_code)] // reason: the one module where unsafe lives, see its docs
pub mod sys;
