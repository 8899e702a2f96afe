//! The decision engine: request facts in, [`Decision`] out.
//!
//! Built once per [`SidecarConfig`] ([`Engine::new`]: templates, methods and CIDR blocks
//! compiled once, see [`compiled`]), then shared by every request. A decision runs these
//! stages in order, each in its own module:
//!
//! 1. [`surface`]: the request line (no TRACE, no method or path overrides), path
//!    normalization, then the declared API (undeclared, sunset);
//! 2. [`authz`]: Deny rules, Allow rules with their bindings, default deny;
//! 3. [`quotas`]: every matching quota, the tightest verdict reported.
//!
//! Audit (whole port or one rule) turns a refusal into a would-deny that lets the request
//! through ([`Verdict::WouldDeny`]). A [`Tracer`] records every rule considered, for
//! `apiward explain`; the sidecar passes [`NoTrace`].

mod authz;
mod compiled;
mod decision;
mod facts;
mod quotas;
mod surface;
#[cfg(test)]
mod tests;
mod trace;

use std::collections::HashMap;

use crate::config::{MtlsMode, PortPolicy, QuotaConfig, SidecarConfig};
use crate::normalize::normalize;
use crate::quota::{QuotaStore, QuotaVerdict};

pub use compiled::EngineError;
pub use decision::{Decision, PendingQuota, QuotaOutcome, Reason, RuleRef, Verdict};
pub use facts::{
    ApiKeyIdentity, Headers, Identity, JwtIdentity, Request, claim_matches, claim_str,
    principal_of, spiffe_parts,
};
pub use surface::{METHOD_OVERRIDE_HEADERS, PATH_OVERRIDE_HEADERS};
pub use trace::{NoTrace, TraceStep, Tracer};

use compiled::PortEngine;
use trace::step;

/// A compiled config, ready to decide.
#[derive(Debug)]
pub struct Engine {
    version: String,
    /// The mesh's SPIFFE trust domain: `namespaces` match only identities of it.
    trust_domain: String,
    default_mtls: MtlsMode,
    ports: HashMap<u16, PortEngine>,
}

impl Engine {
    /// Compiles a config. Fails only on configs the compiler would never produce.
    pub fn new(cfg: &SidecarConfig) -> Result<Self, EngineError> {
        let mut ports = HashMap::new();
        for p in &cfg.ports {
            ports.insert(p.port, PortEngine::new(p)?);
        }
        Ok(Self {
            version: cfg.version.clone(),
            trust_domain: cfg.trust_domain.clone(),
            default_mtls: cfg.default_mtls,
            ports,
        })
    }

    /// The config version this engine enforces.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The mTLS mode of a port.
    pub fn mtls(&self, port: u16) -> MtlsMode {
        self.ports
            .get(&port)
            .map_or(self.default_mtls, |p| p.cfg.mtls)
    }

    /// The compiled policy of a port, if a policy selects it.
    pub fn port(&self, port: u16) -> Option<&PortPolicy> {
        self.ports.get(&port).map(|p| &p.cfg)
    }

    /// Decides one request.
    pub fn decide<'e>(
        &'e self,
        req: &Request<'_>,
        quotas: &dyn QuotaStore,
        trace: &mut dyn Tracer,
    ) -> Decision<'e> {
        let mut d = Decision::new(self.mtls(req.port));
        if let Err(reason) = surface::request_line(req) {
            d.deny(reason);
            return d;
        }
        let path = match normalize(req.path) {
            Ok(p) => p,
            Err(e) => {
                if trace.enabled() {
                    trace.step(step("", "path", false, format!("{}: {e}", req.path)));
                }
                d.deny(Reason::InvalidPath);
                d.detail = Some(e.to_string());
                return d;
            }
        };
        let Some(port) = self.ports.get(&req.port) else {
            if trace.enabled() {
                trace.step(step(
                    "",
                    "port",
                    false,
                    format!("no policy selects port {}: allowed", req.port),
                ));
            }
            d.path = path.into_string();
            return d;
        };
        d.selected = true;
        if trace.enabled() && path.as_str() != req.path {
            trace.step(step(
                "",
                "path",
                true,
                format!("normalized {} to {}", req.path, path.as_str()),
            ));
        }
        let mut matched: Vec<u32> = Vec::new();
        if port.cfg.api.declared
            && surface::declared(port, req, &path, &mut matched, trace, &mut d).is_break()
        {
            return d;
        }
        let authorized = authz::authorize(
            port,
            &self.trust_domain,
            req,
            &path,
            &mut matched,
            trace,
            &mut d,
        );
        if authorized.is_break() {
            return d;
        }
        if !port.cfg.quotas.is_empty() {
            quotas::apply(port, req, &path, quotas, trace, &mut d);
        }
        if d.template.is_none() {
            d.template = matched.first().map(|&t| port.rules.template(t).as_str());
        }
        d.path = path.into_string();
        d
    }

    /// Applies the verdict for a [`PendingQuota`] of `d` (asked of the store by the caller).
    /// Returns false if the quota refused the request (then `d` says so).
    pub fn settle_quota<'e>(
        &'e self,
        d: &mut Decision<'e>,
        pending: PendingQuota,
        verdict: QuotaVerdict,
    ) -> bool {
        let Some(q) = self.quota(&pending) else {
            return true;
        };
        quotas::merge(d, q, pending.key, verdict, pending.audit, pending.now_ms)
    }

    /// The quota a [`PendingQuota`] refers to.
    pub fn quota(&self, pending: &PendingQuota) -> Option<&QuotaConfig> {
        self.ports
            .get(&pending.port)
            .and_then(|p| p.cfg.quotas.get(pending.index))
    }
}
