//! copilot-lb: a session-aware, highly available load-balancing proxy for GitHub Copilot CLI
//! servers running in headless mode.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod affinity;
pub mod app;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod codec;
pub mod config;
pub mod context;
pub mod envelope;
pub mod health;
pub mod hygiene;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod rpc;
pub mod runtime;
pub mod sidecar;
pub mod tls;
pub mod wire;
