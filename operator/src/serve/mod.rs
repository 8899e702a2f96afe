//! The operator's servers: the identity endpoint (and, with the Kubernetes sources, the
//! config stream and the injection webhook).

pub mod identity;
