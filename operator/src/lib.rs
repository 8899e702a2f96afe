//! apiward operator and CLI.
//!
//! Stage: the control plane. In: `ApiPolicy` objects, Pods, Secrets and ConfigMaps — from
//! the Kubernetes API (`apiward operator`: [`cluster`], [`index`]) or from files (`apiward
//! local`, `check`, `explain`: [`local`], [`load`]). Out: per-pod `SidecarConfig`s from the
//! pure [`compile`]r, pushed by the config server ([`serve`]) with workload certificates
//! ([`identity`]); `ApiPolicy.status` ([`status`]); the injection webhook; the CLI ([`cli`]).
#![forbid(unsafe_code)]

pub mod cli;
pub mod cluster;
pub mod compile;
pub mod identity;
pub mod index;
pub mod load;
pub mod local;
pub mod serve;
pub mod status;
pub mod telemetry;
