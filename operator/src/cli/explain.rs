//! `apiward explain`: the decision for one request, with every rule considered.

use std::path::PathBuf;
use std::process::ExitCode;

use super::scenario::{self, Caller, CallerJwt, TestRequest, TestWorkload};
use super::{EXIT_FAILED, EXIT_USAGE};
use crate::load;

/// `apiward explain -f POLICIES --workload NS/KEY=VALUE[,KEY=VALUE] 'METHOD /path'`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The request, e.g. 'GET /users/42' (a query string may follow the path).
    pub request: String,
    /// Policy files or directories.
    #[arg(short = 'f', long = "policies", required_unless_present = "cluster")]
    pub policies: Vec<PathBuf>,
    /// Decide with the ApiPolicies in force in the cluster (the workload's namespace;
    /// kubeconfig as kubectl) instead of, or besides, files.
    #[arg(long)]
    pub cluster: bool,
    /// The workload: its namespace and labels, e.g. shop/app=users.
    #[arg(long)]
    pub workload: String,
    /// The inbound port (default: the first port a selecting policy names).
    #[arg(long)]
    pub port: Option<u16>,
    /// Caller's mTLS identity as namespace/serviceaccount.
    #[arg(long = "from")]
    pub from: Option<String>,
    /// JWT provider name (with --claim).
    #[arg(long, default_value = "")]
    pub jwt: String,
    /// A claim of the caller's verified JWT, NAME=VALUE (repeatable).
    #[arg(long = "claim")]
    pub claims: Vec<String>,
    /// The caller's API key as provider#client.
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// A request header NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Source IP.
    #[arg(long = "source-ip")]
    pub source_ip: Option<std::net::IpAddr>,
}

pub(super) fn run(args: &ExplainArgs) -> ExitCode {
    match explain(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("apiward explain: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn kv(s: &str, what: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{what} {s:?} must be NAME=VALUE"))
}

fn explain(args: &ExplainArgs) -> Result<ExitCode, String> {
    let mut input = load::read(&args.policies).map_err(|e| e.to_string())?;
    if args.cluster {
        let ns = args.workload.split_once('/').map(|(ns, _)| ns.to_owned());
        let live = super::cluster::with_client(async move |c| {
            super::cluster::read(&c, ns.as_deref()).await
        })?;
        input.objects.extend(live.objects);
    }
    for f in &input.findings {
        eprintln!("{f}");
    }
    let (method, path) = args
        .request
        .trim()
        .split_once(' ')
        .ok_or("the request must be 'METHOD /path'")?;
    let (ns, labels) = args
        .workload
        .split_once('/')
        .ok_or("--workload must be NAMESPACE/KEY=VALUE[,KEY=VALUE]")?;
    let labels = labels
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| kv(s, "label"))
        .collect::<Result<_, _>>()?;
    let mut claims = serde_json::Map::new();
    for c in &args.claims {
        let (k, v) = kv(c, "claim")?;
        claims.insert(k, serde_json::Value::String(v));
    }
    let jwt = (!claims.is_empty() || !args.jwt.is_empty()).then(|| CallerJwt {
        provider: if args.jwt.is_empty() {
            guess_provider(&input).unwrap_or_default()
        } else {
            args.jwt.clone()
        },
        claims,
    });
    let caller = Caller {
        service_account: args.from.clone(),
        identity: None,
        jwt,
        api_key: args.api_key.clone(),
        source_ip: args.source_ip,
    };
    let request = TestRequest {
        method: method.to_uppercase(),
        path: path.trim().to_owned(),
        headers: args
            .headers
            .iter()
            .map(|h| kv(h, "header").map(|(k, v)| (k.to_lowercase(), v)))
            .collect::<Result<_, _>>()?,
    };
    let workload = TestWorkload {
        namespace: ns.to_owned(),
        labels,
        port: args.port,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let o = scenario::run(&input, &workload, &request, &caller, "cluster.local", now)?;
    println!("request:  {} {}", request.method, request.path);
    println!(
        "policies: {}",
        if o.policies.is_empty() {
            "none select this workload".into()
        } else {
            o.policies.join(", ")
        }
    );
    println!("trace:");
    for s in &o.trace {
        let mark = if s.matched { "✓" } else { "·" };
        let who = if s.policy.is_empty() {
            s.name.clone()
        } else {
            format!("{}/{}", s.policy, s.name)
        };
        println!("  {mark} {who}: {}", s.why);
    }
    let verdict = match (o.allowed, o.would_deny) {
        (true, false) => "ALLOW".to_string(),
        (true, true) => "ALLOW (Audit mode: would deny)".to_string(),
        (false, _) => format!("DENY {}", o.status),
    };
    println!(
        "decision: {verdict} — reason {}{}{}",
        o.reason,
        o.rule.map(|r| format!(", by {r}")).unwrap_or_default(),
        o.detail.map(|d| format!(": {d}")).unwrap_or_default()
    );
    Ok(if o.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// With --claim but no --jwt, use the only JWT provider name the policies declare.
fn guess_provider(input: &load::Input) -> Option<String> {
    let mut names: Vec<String> = input
        .objects
        .iter()
        .filter_map(|o| match &o.object {
            load::Object::Policy(p) => Some(
                p.spec
                    .authentication
                    .iter()
                    .flat_map(|a| a.jwt.iter().map(|j| j.name.clone()))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    names.sort();
    names.dedup();
    (names.len() == 1).then(|| names.remove(0))
}
