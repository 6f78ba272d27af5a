//! Fixtures for copilot-lb's tests, benchmarks and fuzzers.
//!
//! A crate of its own, used only as a dev-dependency, so that `cargo build --release` never
//! compiles a fake server into the proxy. Proxy-specific setup (starting an in-process proxy
//! with a test config) stays with the integration tests in `tests/common`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fake_cli;
pub mod pki;
pub mod redis;
