//! Integration tests of Verge: real `verge up` processes, the real CLI, real
//! guest components from four toolchains, curl and an HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod kit;

mod auth;
mod bad_input;
mod cluster;
mod edge;
mod events;
mod hostile;
mod kv;
mod metering;
mod observe;
mod outbound;
mod reuse;
mod serving;
mod versions;
