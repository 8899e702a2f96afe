//! Running one request against compiled policies, offline: shared by `apiward check`'s
//! policy tests and `apiward explain`, so both say exactly what a sidecar would do.

use std::collections::BTreeMap;
use std::net::IpAddr;

use apiward_policy::engine::{
    ApiKeyIdentity, Decision, Engine, Identity, JwtIdentity, Request, TraceStep, Tracer,
};
use apiward_policy::quota::LocalQuotas;
use serde::Deserialize;

use crate::compile::{self, Inputs, Workload};
use crate::load::{Input, Object};

/// The caller of a scenario.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Caller {
    /// mTLS identity as `namespace/serviceaccount`.
    #[serde(default)]
    pub service_account: Option<String>,
    /// mTLS identity as a SPIFFE ID.
    #[serde(default)]
    pub identity: Option<String>,
    /// A verified JWT.
    #[serde(default)]
    pub jwt: Option<CallerJwt>,
    /// A valid API key, as `provider#client`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Source IP (default 10.0.0.1).
    #[serde(default, rename = "sourceIP")]
    pub source_ip: Option<IpAddr>,
}

/// A token's provider (the policy's `authentication.jwt[].name`) and claims.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerJwt {
    /// Provider name.
    pub provider: String,
    /// Claims.
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// The request of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// Method.
    pub method: String,
    /// Path, optionally with `?query`.
    pub path: String,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// The workload a scenario targets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestWorkload {
    /// Namespace.
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Port (default: the first port a selecting policy names, else 8080).
    #[serde(default)]
    pub port: Option<u16>,
}

/// The result of running a scenario.
#[derive(Debug)]
pub struct Outcome {
    /// Allowed (true also for Audit would-denies).
    pub allowed: bool,
    /// Would-deny.
    pub would_deny: bool,
    /// Status the client sees.
    pub status: u16,
    /// Reason code.
    pub reason: &'static str,
    /// `policy/rule` that decided.
    pub rule: Option<String>,
    /// Binding or path detail.
    pub detail: Option<String>,
    /// The trace.
    pub trace: Vec<TraceStep>,
    /// Policies selecting the workload.
    pub policies: Vec<String>,
}

/// Compiles `input` for a synthetic pod and decides one request.
pub fn run(
    input: &Input,
    workload: &TestWorkload,
    request: &TestRequest,
    caller: &Caller,
    trust_domain: &str,
    now_ms: u64,
) -> Result<Outcome, String> {
    let mut inputs = Inputs {
        trust_domain: trust_domain.into(),
        ..Default::default()
    };
    for o in &input.objects {
        match &o.object {
            Object::Policy(p) => inputs.policies.push((**p).clone()),
            Object::Secret(s) => inputs.secrets.push((**s).clone()),
            Object::ConfigMap(c) => inputs.config_maps.push((**c).clone()),
        }
    }
    let selecting: Vec<&apiward_crds::ApiPolicy> = inputs
        .policies
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(workload.namespace.as_str())
                && compile::selects(&p.spec.target_ref.selector, &workload.labels)
        })
        .collect();
    let port = workload
        .port
        .or_else(|| {
            selecting
                .iter()
                .flat_map(|p| p.spec.target_ref.ports.iter().copied())
                .next()
        })
        .unwrap_or(8080);
    let policy_names: Vec<String> = selecting
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                workload.namespace,
                p.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    inputs.workloads.push(Workload {
        namespace: workload.namespace.clone(),
        name: "test-pod".into(),
        labels: workload.labels.clone(),
        service_account: "default".into(),
        ports: vec![port],
    });
    let out = compile::compile(&inputs);
    for name in &policy_names {
        if let Some(c) = out
            .policies
            .get(name)
            .and_then(|r| r.conditions.iter().find(|c| !c.status))
        {
            return Err(format!(
                "policy {name} is not usable: {} ({})",
                c.message, c.reason
            ));
        }
    }
    let cfg = out.configs.values().next().ok_or("no config compiled")?;
    let engine = Engine::new(cfg).map_err(|e| e.to_string())?;
    let (path, query) = match request.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (request.path.as_str(), None),
    };
    let headers: Vec<(&str, &str)> = request
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let peer = caller.identity.clone().or_else(|| {
        caller.service_account.as_ref().map(|sa| {
            let (ns, name) = sa.split_once('/').unwrap_or(("default", sa));
            format!("spiffe://{trust_domain}/ns/{ns}/sa/{name}")
        })
    });
    // Providers are named per policy; find the policy on this port that declares it.
    let port_policy = engine.port(port);
    let provider_id =
        |name: &str, ids: &dyn Fn(&apiward_policy::config::PortPolicy) -> Vec<String>| -> String {
            port_policy
                .and_then(|pp| {
                    ids(pp)
                        .into_iter()
                        .find(|id| id.rsplit('/').next() == Some(name))
                })
                .unwrap_or_else(|| name.to_owned())
        };
    let jwt_id = caller
        .jwt
        .as_ref()
        .map(|j| provider_id(&j.provider, &|pp| pp.jwt_providers.clone()));
    let key = caller.api_key.as_ref().map(|k| {
        let (p, c) = k.split_once('#').unwrap_or((k, "client"));
        (
            provider_id(p, &|pp| pp.api_key_providers.clone()),
            c.to_owned(),
        )
    });
    let identity = Identity {
        peer: peer.as_deref(),
        jwt: caller
            .jwt
            .as_ref()
            .zip(jwt_id.as_deref())
            .map(|(j, id)| JwtIdentity {
                provider: id,
                claims: &j.claims,
            }),
        api_key: key.as_ref().map(|(p, c)| ApiKeyIdentity {
            provider: p,
            client: c,
        }),
    };
    let req = Request {
        port,
        method: &request.method,
        path,
        query,
        headers: &headers,
        identity,
        source_ip: caller.source_ip.unwrap_or(IpAddr::from([10, 0, 0, 1])),
        now_ms,
    };
    let quotas = LocalQuotas::new(1024);
    let mut trace: Vec<TraceStep> = Vec::new();
    let d: Decision<'_> = engine.decide(&req, &quotas, &mut trace as &mut dyn Tracer);
    Ok(Outcome {
        allowed: d.allowed(),
        would_deny: d.would_deny(),
        status: d.status(),
        reason: d.reason().code(),
        rule: d.rule.map(|r| format!("{}/{}", r.policy, r.name)),
        detail: d.detail.clone(),
        trace,
        policies: policy_names,
    })
}
