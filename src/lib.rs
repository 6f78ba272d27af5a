//! copilot-lb: a session-aware, highly available load-balancing proxy for GitHub Copilot CLI
//! servers running in headless mode.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod affinity;
pub mod app;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod codec;
pub mod config;
pub mod context;
pub mod envelope;
mod fair;
pub mod health;
mod history;
mod hygiene;
pub mod managed;
mod metrics;
mod policy;
mod proxy;
mod registry;
mod route;
pub mod rpc;
pub mod runtime;
mod sidecar;
pub mod status_cli;
mod tls;
pub mod wire;
