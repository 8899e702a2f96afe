//! apiward-policy — the policy a sidecar executes.
//!
//! Stage: between the operator's compiler and the sidecar's request pipeline.
//! In: a [`config::SidecarConfig`] (operator → sidecar). Out: [`report::Report`]s
//! (sidecar → operator) and, per request, a decision. Pure and I/O-free: no clock
//! (time is passed in), no sockets, no files, so the operator's `check` and `explain`
//! run exactly the code the sidecar runs.
//!
//! - [`config`] and [`report`]: the wire contract, JSON with an `apiVersion` each.
//! - [`template`]: path templates (`/users/{userId}`, `*`, `**`).
//! - [`duration`]: the duration syntax policies use.
#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
pub mod engine;
pub mod inventory;
pub mod mesh;
pub mod normalize;
pub mod quota;
pub mod report;
pub mod router;
pub mod template;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod time;

pub use config::SidecarConfig;
pub use report::Report;
