//! apiward operator and CLI.
//!
//! Stage: the control plane. In: `ApiPolicy` objects (from files now; from the
//! Kubernetes API in `apiward operator`). Out: validation results and the CRD (`check`,
//! `crds`). The compiler, config server and status writer join here as they land.
#![forbid(unsafe_code)]

pub mod cli;
pub mod compile;
pub mod identity;
pub mod load;
pub mod local;
pub mod serve;
pub mod status;
