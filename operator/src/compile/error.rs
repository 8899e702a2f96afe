//! Why a policy does not compile, as one typed error per failure; each becomes the condition
//! a user reads on the policy.

use apiward_crds as crds;

use super::PolicyCondition;

/// A policy that cannot be compiled, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The spec is invalid (the fields and reasons, `; `-joined).
    #[error("{0}")]
    Invalid(String),
    /// A referenced Secret, key or ConfigMap does not exist.
    #[error("not found: {}", .0.join(", "))]
    MissingRefs(Vec<String>),
    /// A referenced document exists but cannot be used.
    #[error("{what}: {message}")]
    InvalidRef {
        /// The reference (`ConfigMap shop/openapi key spec.yaml`).
        what: String,
        /// Why.
        message: String,
    },
    /// A duration that does not parse (admission refuses these; a hand-fed spec may not).
    #[error("{field}: {value:?} is not a duration (like 30s, 5m, 1h)")]
    Duration {
        /// The field.
        field: String,
        /// The value.
        value: String,
    },
    /// A Calendar window per that is no calendar unit.
    #[error(
        "{field}: a Calendar window's per must be one of 1s, 1m, 1h, 1d, 24h, 1mo, not {value:?}"
    )]
    CalendarUnit {
        /// The field.
        field: String,
        /// The value.
        value: String,
    },
    /// Two policies selecting the same pods and port disagree where they cannot be merged.
    #[error("{0}")]
    Conflict(String),
}

impl CompileError {
    /// The condition this error sets on the policy.
    pub fn condition(&self) -> PolicyCondition {
        use crds::conditions::{ACCEPTED, RESOLVED_REFS, reasons};
        let (type_, reason) = match self {
            CompileError::Invalid(_)
            | CompileError::Duration { .. }
            | CompileError::CalendarUnit { .. } => (ACCEPTED, reasons::INVALID),
            CompileError::MissingRefs(_) => (RESOLVED_REFS, reasons::REF_NOT_FOUND),
            CompileError::InvalidRef { .. } => (RESOLVED_REFS, reasons::INVALID_REF),
            CompileError::Conflict(_) => (ACCEPTED, reasons::CONFLICTED),
        };
        PolicyCondition {
            type_,
            status: false,
            reason,
            message: self.to_string(),
        }
    }
}
