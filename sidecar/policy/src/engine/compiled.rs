//! A port's policy compiled once, when a config loads: path templates parsed into routers,
//! methods into bit sets, CIDR blocks into [`ipnet::IpNet`]s. Requests only look things up.

use ipnet::IpNet;

use crate::config::{HeaderMatch, Operation, PortPolicy, Source};
use crate::router::Router;
use crate::template::PathTemplate;

use super::facts::Headers;

/// Error building an engine from a config (the compiler never produces one; hand-written
/// configs can).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config at {field}: {message}")]
pub struct EngineError {
    /// Where.
    pub field: String,
    /// What.
    pub message: String,
}

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// A method as one bit of a set (`0x80` for any method not listed above).
pub(crate) fn method_bit(m: &str) -> u8 {
    METHODS
        .iter()
        .position(|x| *x == m)
        .map_or(0x80, |i| 1 << i)
}

/// One operation (`to[]` of a rule, `matches[]` of a quota) without its paths, which live
/// in the router.
#[derive(Debug, Clone)]
struct CompiledOp {
    /// Bit set of methods; 0 = any.
    methods: u8,
    headers: Vec<HeaderMatch>,
}

impl CompiledOp {
    fn matches(&self, bit: u8, h: &dyn Headers) -> bool {
        (self.methods == 0 || self.methods & bit != 0)
            && self.headers.iter().all(|m| match &m.value {
                None => h.contains(&m.name),
                Some(v) => h.get_one(&m.name) == Some(v.as_str()),
            })
    }
}

/// Which path an item (rule or quota) matched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Target {
    /// A template of the index's router (by id).
    Template(u32),
    /// An operation without paths, or an item without operations.
    AnyPath,
}

/// The operations of a list of items (the rules of a port, or its quotas), indexed by path:
/// the router finds the templates a path matches, and each template links back to the
/// (item, operation) pairs that listed it.
#[derive(Debug, Default)]
pub(crate) struct OpIndex {
    router: Router,
    /// Per item, its operations.
    ops: Vec<Vec<CompiledOp>>,
    /// Template id → (item, operation).
    by_template: Vec<Vec<(u32, u16)>>,
    /// Items with an operation that has no paths: (item, operation); `None` for an item
    /// without operations at all (it matches every request).
    any_path: Vec<(u32, Option<u16>)>,
}

impl OpIndex {
    /// Indexes each item's operations; `field(i)` names item `i`'s list in errors.
    pub(crate) fn build<'a>(
        items: impl Iterator<Item = &'a [Operation]>,
        field: impl Fn(usize) -> String,
    ) -> Result<Self, EngineError> {
        let mut index = Self::default();
        let mut links: Vec<(u32, u32, u16)> = Vec::new();
        for (i, ops) in items.enumerate() {
            if ops.is_empty() {
                index.any_path.push((i as u32, None));
            }
            let mut compiled = Vec::with_capacity(ops.len());
            for (j, op) in ops.iter().enumerate() {
                for (k, p) in op.paths.iter().enumerate() {
                    let t = PathTemplate::parse(p).map_err(|e| EngineError {
                        field: format!("{}[{j}].paths[{k}]", field(i)),
                        message: e.to_string(),
                    })?;
                    links.push((index.router.insert(t), i as u32, j as u16));
                }
                if op.paths.is_empty() {
                    index.any_path.push((i as u32, Some(j as u16)));
                }
                compiled.push(CompiledOp {
                    methods: op.methods.iter().fold(0, |m, x| m | method_bit(x)),
                    headers: op.headers.clone(),
                });
            }
            index.ops.push(compiled);
        }
        index.by_template = vec![Vec::new(); index.router.len()];
        for (t, i, j) in links {
            index.by_template[t as usize].push((i, j));
        }
        Ok(index)
    }

    /// The items one of whose operations matches the request, in item order, each with the
    /// first path it matched on. `matched` receives the router's matching templates.
    pub(crate) fn matching(
        &self,
        path: &crate::normalize::NormalizedPath,
        bit: u8,
        headers: &dyn Headers,
        matched: &mut Vec<u32>,
    ) -> Vec<(u32, Target)> {
        self.router.matches(path, matched);
        let mut out = Vec::new();
        for &t in matched.iter() {
            for &(i, j) in &self.by_template[t as usize] {
                if self.ops[i as usize][j as usize].matches(bit, headers) {
                    out.push((i, Target::Template(t)));
                }
            }
        }
        for &(i, j) in &self.any_path {
            let ok = match j {
                None => true,
                Some(j) => self.ops[i as usize][j as usize].matches(bit, headers),
            };
            if ok {
                out.push((i, Target::AnyPath));
            }
        }
        out.sort_unstable();
        out.dedup_by_key(|c| c.0);
        out
    }

    /// The template with this id.
    pub(crate) fn template(&self, id: u32) -> &PathTemplate {
        self.router.template(id)
    }
}

/// One `from[]` entry with its CIDR blocks parsed.
#[derive(Debug, Clone)]
pub(crate) struct CompiledSource {
    pub(crate) source: Source,
    pub(crate) ip_blocks: Vec<IpNet>,
}

impl CompiledSource {
    /// Whether `ip` is in one of the blocks (an IPv4-mapped IPv6 address counts as IPv4).
    pub(crate) fn ip_allowed(&self, ip: std::net::IpAddr) -> bool {
        let v4 = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
            std::net::IpAddr::V4(_) => None,
        };
        self.ip_blocks
            .iter()
            .any(|b| b.contains(&ip) || v4.is_some_and(|v4| b.contains(&v4)))
    }
}

/// The declared endpoints of a port, by path.
#[derive(Debug, Default)]
pub(crate) struct DeclaredSurface {
    pub(crate) router: Router,
    /// Template id → endpoint indices.
    pub(crate) of_template: Vec<Vec<u32>>,
    /// Per endpoint: its path has no parameters or wildcards (preferred over a template
    /// that also matches).
    pub(crate) exact: Vec<bool>,
}

/// A port's policy, compiled.
#[derive(Debug)]
pub(crate) struct PortEngine {
    pub(crate) cfg: PortPolicy,
    /// Operations of `cfg.rules[].to`.
    pub(crate) rules: OpIndex,
    /// Per rule, its sources (parallel to `cfg.rules[i].from`).
    pub(crate) sources: Vec<Vec<CompiledSource>>,
    pub(crate) declared: DeclaredSurface,
    /// Operations of `cfg.quotas[].matches`.
    pub(crate) quotas: OpIndex,
}

impl PortEngine {
    pub(crate) fn new(cfg: &PortPolicy) -> Result<Self, EngineError> {
        let port = cfg.port;
        let rules = OpIndex::build(cfg.rules.iter().map(|r| r.to.as_slice()), |i| {
            format!("ports[{port}].rules[{i}].to")
        })?;
        let mut sources = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.iter().enumerate() {
            let mut srcs = Vec::with_capacity(r.from.len());
            for (j, s) in r.from.iter().enumerate() {
                let mut ip_blocks = Vec::with_capacity(s.ip_blocks.len());
                for (k, c) in s.ip_blocks.iter().enumerate() {
                    ip_blocks.push(c.parse::<IpNet>().map_err(|_| EngineError {
                        field: format!("ports[{port}].rules[{i}].from[{j}].ipBlocks[{k}]"),
                        message: format!("{c:?} is not a CIDR block"),
                    })?);
                }
                srcs.push(CompiledSource {
                    source: s.clone(),
                    ip_blocks,
                });
            }
            sources.push(srcs);
        }
        let mut declared = DeclaredSurface::default();
        for (i, ep) in cfg.api.endpoints.iter().enumerate() {
            let t = PathTemplate::parse(&ep.path).map_err(|e| EngineError {
                field: format!("ports[{port}].api.endpoints[{i}].path"),
                message: e.to_string(),
            })?;
            declared.exact.push(t.is_exact());
            let id = declared.router.insert(t) as usize;
            if declared.of_template.len() <= id {
                declared.of_template.resize(id + 1, Vec::new());
            }
            declared.of_template[id].push(i as u32);
        }
        let quotas = OpIndex::build(cfg.quotas.iter().map(|q| q.matches.as_slice()), |i| {
            format!("ports[{port}].quotas[{i}].matches")
        })?;
        Ok(Self {
            cfg: cfg.clone(),
            rules,
            sources,
            declared,
            quotas,
        })
    }

    /// The whole port is in Audit mode.
    pub(crate) fn audit(&self) -> bool {
        self.cfg.mode == crate::config::Mode::Audit
    }
}
