//! Builders for tests (feature `test-util`): configs and requests written as what they say,
//! e.g. `SidecarConfig::test().port(PortPolicy::test(8080).rule(RuleConfig::allow("read")
//! .to(&["GET"], &["/users/{id}"])))`, and a [`TestRequest`] that owns its facts.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::config::{
    Action, ApiSurface, BindSource, Binding, Endpoint, HeaderMatch, JwtMatch, Mode, MtlsMode,
    Operation, PortPolicy, QuotaConfig, QuotaKey, QuotaScope, RuleConfig,
    SIDECAR_CONFIG_API_VERSION, SidecarConfig, Source, UndeclaredAction, Window, Workload,
};
use crate::engine::{ApiKeyIdentity, Decision, Engine, Identity, JwtIdentity, NoTrace, Request};
use crate::quota::QuotaStore;

/// The policy every test rule and quota belongs to.
pub const TEST_POLICY: &str = "default/test";

impl SidecarConfig {
    /// A config for pod `default/app` in trust domain `cluster.local`, with no ports.
    pub fn test() -> Self {
        Self {
            api_version: SIDECAR_CONFIG_API_VERSION.into(),
            version: "test".into(),
            workload: Workload {
                namespace: "default".into(),
                name: "app".into(),
                service_account: "app".into(),
            },
            trust_domain: "cluster.local".into(),
            default_mtls: MtlsMode::Strict,
            ports: Vec::new(),
            jwt_providers: Vec::new(),
            api_key_providers: Vec::new(),
            egress: Default::default(),
            requires: Vec::new(),
        }
    }

    /// Adds a port.
    pub fn port(mut self, p: PortPolicy) -> Self {
        self.ports.push(p);
        self
    }

    /// The engine for this config (panics if it does not compile: a test mistake).
    pub fn engine(&self) -> Engine {
        Engine::new(self).expect("test config compiles")
    }
}

impl PortPolicy {
    /// Port `port`, selected by [`TEST_POLICY`], enforcing, strict mTLS, no rules (so
    /// default deny).
    pub fn test(port: u16) -> Self {
        Self {
            port,
            policies: vec![TEST_POLICY.into()],
            mtls: MtlsMode::Strict,
            mode: Mode::Enforce,
            jwt_providers: Vec::new(),
            api_key_providers: Vec::new(),
            rules: Vec::new(),
            quotas: Vec::new(),
            limits: Default::default(),
            response: Default::default(),
            api: ApiSurface::default(),
        }
    }

    /// Adds a rule.
    pub fn rule(mut self, r: RuleConfig) -> Self {
        self.rules.push(r);
        self
    }

    /// Adds a quota.
    pub fn quota(mut self, q: QuotaConfig) -> Self {
        self.quotas.push(q);
        self
    }

    /// The whole port in Audit mode.
    pub fn audit(mut self) -> Self {
        self.mode = Mode::Audit;
        self
    }

    /// Declares an endpoint (and so turns the declared API on).
    pub fn declare(mut self, method: &str, path: &str) -> Self {
        self.api.declared = true;
        self.api.endpoints.push(Endpoint {
            method: method.into(),
            path: path.into(),
            deprecated: false,
            sunset_unix: None,
        });
        self
    }

    /// Declares an endpoint that is retired at `sunset_unix`.
    pub fn declare_sunset(mut self, method: &str, path: &str, sunset_unix: i64) -> Self {
        self = self.declare(method, path);
        if let Some(e) = self.api.endpoints.last_mut() {
            e.deprecated = true;
            e.sunset_unix = Some(sunset_unix);
        }
        self
    }

    /// What happens to undeclared endpoints.
    pub fn undeclared(mut self, a: UndeclaredAction) -> Self {
        self.api.declared = true;
        self.api.undeclared = a;
        self
    }
}

impl RuleConfig {
    fn test(name: &str, action: Action) -> Self {
        Self {
            policy: TEST_POLICY.into(),
            name: name.into(),
            action,
            audit: false,
            from: Vec::new(),
            to: Vec::new(),
            bind: Vec::new(),
        }
    }

    /// An Allow rule matching everything until `to`/`from` narrow it.
    pub fn allow(name: &str) -> Self {
        Self::test(name, Action::Allow)
    }

    /// A Deny rule matching everything until `to`/`from` narrow it.
    pub fn deny(name: &str) -> Self {
        Self::test(name, Action::Deny)
    }

    /// Adds an operation: these methods (empty: any) on these paths (empty: any).
    pub fn to(mut self, methods: &[&str], paths: &[&str]) -> Self {
        self.to.push(op(methods, paths));
        self
    }

    /// Adds an operation that also needs a header (with this value, if given).
    pub fn to_with_header(
        mut self,
        methods: &[&str],
        paths: &[&str],
        header: &str,
        value: Option<&str>,
    ) -> Self {
        let mut o = op(methods, paths);
        o.headers.push(HeaderMatch {
            name: header.into(),
            value: value.map(Into::into),
        });
        self.to.push(o);
        self
    }

    /// Adds a source.
    pub fn from(mut self, s: Source) -> Self {
        self.from.push(s);
        self
    }

    /// Binds path parameter `param` to JWT claim `claim`.
    pub fn bind_path(mut self, param: &str, claim: &str) -> Self {
        self.bind.push(Binding {
            source: BindSource::PathParam(param.into()),
            claim: claim.into(),
        });
        self
    }

    /// Binds query parameter `param` to JWT claim `claim`.
    pub fn bind_query(mut self, param: &str, claim: &str) -> Self {
        self.bind.push(Binding {
            source: BindSource::QueryParam(param.into()),
            claim: claim.into(),
        });
        self
    }

    /// Binds header `name` to JWT claim `claim`.
    pub fn bind_header(mut self, name: &str, claim: &str) -> Self {
        self.bind.push(Binding {
            source: BindSource::Header(name.into()),
            claim: claim.into(),
        });
        self
    }

    /// This rule in Audit mode.
    pub fn audit(mut self) -> Self {
        self.audit = true;
        self
    }
}

fn op(methods: &[&str], paths: &[&str]) -> Operation {
    Operation {
        methods: methods.iter().map(|m| m.to_string()).collect(),
        paths: paths.iter().map(|p| p.to_string()).collect(),
        headers: Vec::new(),
    }
}

impl Source {
    /// An mTLS peer of service account `sa` in namespace `ns`.
    pub fn service_account(ns: &str, sa: &str) -> Self {
        Self {
            principals: vec![format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")],
            ..Default::default()
        }
    }

    /// Any mTLS peer of namespace `ns`.
    pub fn namespace(ns: &str) -> Self {
        Self {
            namespaces: vec![ns.into()],
            ..Default::default()
        }
    }

    /// A JWT of `provider` with these claims.
    pub fn jwt(provider: &str, claims: &[(&str, &str)]) -> Self {
        Self {
            jwt: Some(JwtMatch {
                provider: provider.into(),
                claims: claims
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    /// A caller from one of these CIDR blocks.
    pub fn ip_blocks(blocks: &[&str]) -> Self {
        Self {
            ip_blocks: blocks.iter().map(|b| b.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Only callers with no identity at all.
    pub fn unauthenticated() -> Self {
        Self {
            unauthenticated: true,
            ..Default::default()
        }
    }
}

impl QuotaConfig {
    /// `requests` per `period_ms`, Rolling, Local, rejecting, for every request of the port.
    pub fn test(name: &str, key: QuotaKey, requests: u64, period_ms: u64) -> Self {
        Self {
            policy: TEST_POLICY.into(),
            name: name.into(),
            matches: Vec::new(),
            key,
            requests,
            period_ms,
            burst: 0,
            window: Window::Rolling,
            scope: QuotaScope::Local,
            on_exceed: Default::default(),
            on_store_error: Default::default(),
            audit: false,
        }
    }

    /// Counts only requests of this operation.
    pub fn matching(mut self, methods: &[&str], paths: &[&str]) -> Self {
        self.matches.push(op(methods, paths));
        self
    }

    /// Exceeding it is only a would-deny.
    pub fn audit(mut self) -> Self {
        self.audit = true;
        self
    }

    /// Another window.
    pub fn window(mut self, w: Window) -> Self {
        self.window = w;
        self
    }
}

/// A request whose facts it owns: `TestRequest::get("/users/1").jwt("p", json!({..}))`.
#[derive(Debug, Clone)]
pub struct TestRequest {
    /// Inbound port (8080 unless changed).
    pub port: u16,
    /// Method.
    pub method: String,
    /// Raw path.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// mTLS peer SPIFFE ID.
    pub peer: Option<String>,
    /// Verified JWT: provider and claims.
    pub jwt: Option<(String, Map<String, Value>)>,
    /// Valid API key: provider and client.
    pub api_key: Option<(String, String)>,
    /// Source address.
    pub source_ip: IpAddr,
    /// Now, Unix ms.
    pub now_ms: u64,
}

impl TestRequest {
    /// `method path` (a `?` starts the query) on port 8080, anonymous, from 10.0.0.1,
    /// at 2026-01-01T00:00:00Z.
    pub fn new(method: &str, target: &str) -> Self {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (target, None),
        };
        Self {
            port: 8080,
            method: method.into(),
            path: path.into(),
            query,
            headers: Vec::new(),
            peer: None,
            jwt: None,
            api_key: None,
            source_ip: IpAddr::from([10, 0, 0, 1]),
            now_ms: 1_767_225_600_000,
        }
    }

    /// `GET target`.
    pub fn get(target: &str) -> Self {
        Self::new("GET", target)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// From an mTLS peer of service account `sa` in namespace `ns` (trust domain
    /// `cluster.local`).
    pub fn peer(mut self, ns: &str, sa: &str) -> Self {
        self.peer = Some(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"));
        self
    }

    /// With a verified JWT of `provider` carrying `claims` (a JSON object).
    pub fn jwt(mut self, provider: &str, claims: Value) -> Self {
        let Value::Object(m) = claims else {
            panic!("claims must be a JSON object");
        };
        self.jwt = Some((provider.into(), m));
        self
    }

    /// With a valid API key of `provider` for `client`.
    pub fn api_key(mut self, provider: &str, client: &str) -> Self {
        self.api_key = Some((provider.into(), client.into()));
        self
    }

    /// From this address.
    pub fn from_ip(mut self, ip: &str) -> Self {
        self.source_ip = ip.parse().expect("an IP address");
        self
    }

    /// At this time (Unix ms).
    pub fn at(mut self, now_ms: u64) -> Self {
        self.now_ms = now_ms;
        self
    }

    /// The engine's decision on this request.
    pub fn decide<'e>(&self, engine: &'e Engine, quotas: &dyn QuotaStore) -> Decision<'e> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let req = Request {
            port: self.port,
            method: &self.method,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &headers,
            identity: Identity {
                peer: self.peer.as_deref(),
                jwt: self.jwt.as_ref().map(|(p, c)| JwtIdentity {
                    provider: p,
                    claims: c,
                }),
                api_key: self.api_key.as_ref().map(|(p, c)| ApiKeyIdentity {
                    provider: p,
                    client: c,
                }),
            },
            source_ip: self.source_ip,
            now_ms: self.now_ms,
        };
        engine.decide(&req, quotas, &mut NoTrace)
    }
}
