//! In-process tests of the node: its router driven with
//! `tower::ServiceExt::oneshot` (no socket, no process), guests written as
//! WAT. They run in milliseconds and need no guest toolchain; the
//! process-level suite (`crates/verge/tests/it`) keeps what needs real
//! processes and real clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod hops;
mod hygiene;
mod reuse;
mod slow;
mod storage;
mod wat;
