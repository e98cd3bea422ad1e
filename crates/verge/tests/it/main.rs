//! Integration tests of Verge: real `verge up` processes, the real CLI, real
//! guest components from four toolchains, curl and an HTTP client.

mod kit;

mod auth;
mod bad_input;
mod serving;
