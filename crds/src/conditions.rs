//! Condition types and reasons written to `ApiPolicy.status.conditions`, spelled like
//! Gateway API's. Tools (Argo CD, Flux kstatus, `kubectl wait`) key on these strings:
//! they are part of the API.

/// The spec is valid and its lints were evaluated.
pub const ACCEPTED: &str = "Accepted";
/// Every Secret and ConfigMap the policy references was found and usable.
pub const RESOLVED_REFS: &str = "ResolvedRefs";
/// The selected sidecars acknowledged the config compiled from this generation.
pub const PROGRAMMED: &str = "Programmed";
/// Accepted, resolved and programmed: the policy is enforced.
pub const READY: &str = "Ready";
/// True (and only then present) while the policy cannot become Ready without someone
/// changing something: the spec is invalid, a reference is unusable, or sidecars refused
/// the config. The kstatus convention, so Flux (and `kstatus`) report it as failed at
/// once instead of waiting for a timeout.
pub const STALLED: &str = "Stalled";
/// True (and only then present) while the policy is on its way to Ready: sidecars have
/// not all acknowledged the current config yet, or a referenced object does not exist
/// yet. The kstatus convention: Flux reports "in progress".
pub const RECONCILING: &str = "Reconciling";
/// True while some selected sidecars cannot reach the Global quota store (Redis): their
/// Global quotas follow `onStoreError`. Absent when the policy has no Global quota.
pub const QUOTA_STORE_UNAVAILABLE: &str = "QuotaStoreUnavailable";

/// Reasons for the conditions above.
pub mod reasons {
    /// `Accepted=True`.
    pub const ACCEPTED: &str = "Accepted";
    /// `Accepted=True` with lint warnings in the message.
    pub const ACCEPTED_WITH_WARNINGS: &str = "AcceptedWithWarnings";
    /// `Accepted=False`: a field is invalid (the message names it).
    pub const INVALID: &str = "Invalid";
    /// `Accepted=False`: a rule is invalid.
    pub const INVALID_RULE: &str = "InvalidRule";
    /// `Accepted=False`: it conflicts with another policy selecting the same pods.
    pub const CONFLICTED: &str = "Conflicted";
    /// `ResolvedRefs=True`.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// `ResolvedRefs=False`: a Secret or ConfigMap is missing.
    pub const REF_NOT_FOUND: &str = "RefNotFound";
    /// `ResolvedRefs=False`: a referenced object exists but its content is unusable.
    pub const INVALID_REF: &str = "InvalidRef";
    /// `Programmed=True`.
    pub const ALL_SIDECARS_ACKED: &str = "AllSidecarsAcked";
    /// `Programmed=False`: some sidecars have not acknowledged yet.
    pub const PENDING: &str = "Pending";
    /// `Programmed=False`: a sidecar refused the config.
    pub const SIDECAR_REJECTED: &str = "SidecarRejected";
    /// `Programmed=True`: the policy selects no pod (nothing to program).
    pub const NO_TARGETS: &str = "NoTargets";
    /// `Ready=True`.
    pub const READY: &str = "Ready";
    /// `Ready=False`: one of the other conditions is not True.
    pub const NOT_READY: &str = "NotReady";
    /// `QuotaStoreUnavailable=True`: some sidecars cannot reach Redis.
    pub const STORE_UNREACHABLE: &str = "StoreUnreachable";
    /// `QuotaStoreUnavailable=False`: every reporting sidecar reaches Redis.
    pub const STORE_AVAILABLE: &str = "StoreAvailable";
}
