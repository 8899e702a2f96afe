//! The CRD's CEL rules against the API server's static cost limits.
//!
//! When a CRD is created or updated, kube-apiserver estimates the worst-case cost of every
//! `x-kubernetes-validations` rule (cel-go's `checker.Cost` with the Kubernetes size
//! estimator: k8s.io/apiextensions-apiserver `pkg/apiserver/schema/cel/model`) and refuses
//! the CRD when one rule, multiplied by how many times it can run in one object, exceeds
//! `StaticEstimatedCostLimit` (10,000,000), or when the sum over all rules exceeds
//! `StaticEstimatedCRDCostLimit` (100,000,000). kube's `cel` feature evaluates rules but does
//! not estimate them, so this test does, with the same model:
//!
//! - sizes: a string's `maxLength` × 4 (bytes per code point), a list's `maxItems`, a map's
//!   `maxProperties`; anything unbounded is sized from the 3 MiB request limit;
//! - costs: a variable or field read 1, a constant 0, a list literal 10, a call 1 plus its
//!   arguments; `==`/`!=` 0.1 per byte of the smaller side; string `+` 0.1 per byte of the
//!   result; `startsWith`/`endsWith` 0.1 per byte of the argument; `contains` the product of
//!   both sides' 0.1 per byte; `matches` 0.1 × (string + 1) × 0.25 × regex; `in` a list's size;
//!   a macro (`all`, `exists`) its range's size × (its body + 2 or 3);
//! - `has()` costs 1 plus its operand (cel-go ≥ 0.17; 1.28's cel-go charges 0, so the model
//!   is conservative there), and a call the model does not know fails the test.
//!
//! The model is calibrated on the CRD that a real kube-apiserver v1.28.7 refused (committed
//! under `tests/fixtures/`): it reproduces the factors the API server printed.

use serde_json::Value;

use cel::common::ast::{Expr, IdedExpr, LiteralValue};

/// `StaticEstimatedCostLimit`: one rule, times its cardinality.
const PER_RULE_LIMIT: u64 = 10_000_000;
/// `StaticEstimatedCRDCostLimit`: all rules of the schema together.
const CRD_LIMIT: u64 = 100_000_000;
/// `DefaultMaxRequestSizeBytes`: the size of anything unbounded.
const MAX_REQUEST: u64 = 3 * 1024 * 1024;
/// Our own margin: the whole CRD stays within a tenth of the API server's budgets.
const OWN_BUDGET: u64 = CRD_LIMIT / 10;

/// The type of a CEL value, as far as cost goes.
#[derive(Clone, Debug)]
enum Ty<'a> {
    /// A schema node of the CRD.
    Node(&'a Value, String),
    Str(u64),
    List(Box<Ty<'a>>, u64),
    Scalar,
}

struct Estimator<'a> {
    vars: Vec<(String, Ty<'a>)>,
    /// Fields a rule reads whose size has no bound (`maxLength`, `maxItems`, `maxProperties`).
    unbounded: Vec<String>,
}

fn ceil_mul(n: u64, f: f64) -> u64 {
    if n == u64::MAX {
        return u64::MAX;
    }
    (n as f64 * f).ceil() as u64
}

/// The bound of a schema node, or `None` when it has none.
fn bound(node: &Value) -> Option<u64> {
    let n = |k: &str| node.get(k).and_then(Value::as_u64);
    match node.get("type").and_then(Value::as_str) {
        Some("string") => n("maxLength").map(|l| l * 4),
        Some("array") => n("maxItems"),
        Some("object")
            if node
                .get("additionalProperties")
                .is_some_and(Value::is_object) =>
        {
            n("maxProperties")
        }
        _ => Some(1),
    }
}

fn is_sized(node: &Value) -> bool {
    match node.get("type").and_then(Value::as_str) {
        Some("string") | Some("array") => true,
        Some("object") => node
            .get("additionalProperties")
            .is_some_and(Value::is_object),
        _ => false,
    }
}

impl<'a> Estimator<'a> {
    fn size(&self, t: &Ty<'a>) -> u64 {
        match t {
            Ty::Node(n, _) => bound(n).unwrap_or(MAX_REQUEST - 2),
            Ty::Str(s) => *s,
            Ty::List(_, s) => *s,
            Ty::Scalar => 1,
        }
    }

    fn elem(&self, t: &Ty<'a>) -> Result<Ty<'a>, String> {
        match t {
            Ty::Node(n, path) => match n.get("type").and_then(Value::as_str) {
                Some("array") => Ok(Ty::Node(&n["items"], format!("{path}[]"))),
                // A macro over a map ranges over its keys: strings of unknown length.
                Some("object") => Ok(Ty::Str(MAX_REQUEST - 2)),
                other => Err(format!("{path}: cannot range over {other:?}")),
            },
            Ty::List(e, _) => Ok((**e).clone()),
            other => Err(format!("cannot range over {other:?}")),
        }
    }

    fn select(&mut self, operand: Ty<'a>, field: &str) -> Result<Ty<'a>, String> {
        let Ty::Node(n, path) = operand else {
            return Err(format!("select .{field} on a non-object"));
        };
        let child = n
            .get("properties")
            .and_then(|p| p.get(field))
            .ok_or_else(|| format!("{path} has no field {field:?}"))?;
        let child_path = format!("{path}.{field}");
        if is_sized(child) && bound(child).is_none() {
            self.unbounded.push(child_path.clone());
        }
        Ok(Ty::Node(child, child_path))
    }

    fn cost(&mut self, e: &IdedExpr) -> Result<(u64, Ty<'a>), String> {
        Ok(match &e.expr {
            Expr::Literal(LiteralValue::String(s)) => (0, Ty::Str(s.len() as u64)),
            Expr::Literal(_) => (0, Ty::Scalar),
            Expr::Ident(name) => {
                let t = self
                    .vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| format!("unknown variable {name}"))?;
                (1, t)
            }
            Expr::Select(s) => {
                let (c, operand) = self.cost(&s.operand)?;
                let child = self.select(operand, &s.field)?;
                if s.test {
                    (c + 1, Ty::Scalar)
                } else {
                    (c + 1, child)
                }
            }
            Expr::List(l) => {
                let mut sum = 10u64;
                let mut elem = Ty::Scalar;
                for x in &l.elements {
                    let (c, t) = self.cost(x)?;
                    sum = sum.saturating_add(c);
                    if self.size(&t) >= self.size(&elem) {
                        elem = t;
                    }
                }
                (sum, Ty::List(Box::new(elem), l.elements.len() as u64))
            }
            Expr::Comprehension(c) => {
                let (range_cost, range) = self.cost(&c.iter_range)?;
                let (init_cost, init) = self.cost(&c.accu_init)?;
                let n = self.size(&range);
                self.vars.push((c.iter_var.clone(), self.elem(&range)?));
                self.vars.push((c.accu_var.clone(), init));
                let (cond, _) = self.cost(&c.loop_cond)?;
                let (step, _) = self.cost(&c.loop_step)?;
                let (result, t) = self.cost(&c.result)?;
                self.vars.truncate(self.vars.len() - 2);
                let body = n.saturating_mul(cond.saturating_add(step));
                (
                    range_cost
                        .saturating_add(init_cost)
                        .saturating_add(result)
                        .saturating_add(body),
                    t,
                )
            }
            Expr::Call(call) => return self.call(call),
            other => return Err(format!("expression not modelled: {other:?}")),
        })
    }

    fn call(&mut self, call: &cel::common::ast::CallExpr) -> Result<(u64, Ty<'a>), String> {
        let target = match &call.target {
            Some(t) => Some(self.cost(t)?),
            None => None,
        };
        let mut args = Vec::new();
        for a in &call.args {
            args.push(self.cost(a)?);
        }
        let arg_sum = args
            .iter()
            .chain(target.iter())
            .fold(0u64, |s, (c, _)| s.saturating_add(*c));
        let size = |this: &Self, i: usize| this.size(&args[i].1);
        let (own, ty) = match call.func_name.as_str() {
            "_&&_" | "_||_" => (0, Ty::Scalar),
            "_?_:_" => {
                let (t, f) = (&args[1], &args[2]);
                let bigger = if self.size(&t.1) >= self.size(&f.1) {
                    t.1.clone()
                } else {
                    f.1.clone()
                };
                // The condition plus the dearer branch, not both.
                let c = args[0].0.saturating_add(t.0.max(f.0));
                return Ok((c, bigger));
            }
            "_==_" | "_!=_" => (ceil_mul(size(self, 0).min(size(self, 1)), 0.1), Ty::Scalar),
            "_+_" => match (&args[0].1, &args[1].1) {
                (a, b) if self.is_string(a) && self.is_string(b) => {
                    let n = size(self, 0).saturating_add(size(self, 1));
                    (ceil_mul(n, 0.1), Ty::Str(n))
                }
                _ => (1, Ty::Scalar),
            },
            "@in" => (size(self, 1), Ty::Scalar),
            "startsWith" | "endsWith" => (ceil_mul(size(self, 0), 0.1), Ty::Scalar),
            "contains" => {
                let t = self.size(&target.as_ref().ok_or("contains without a target")?.1);
                (
                    ceil_mul(t, 0.1).saturating_mul(ceil_mul(size(self, 0), 0.1)),
                    Ty::Scalar,
                )
            }
            "matches" => {
                let t = self.size(&target.as_ref().ok_or("matches without a target")?.1);
                (
                    ceil_mul(t.saturating_add(1), 0.1)
                        .saturating_mul(ceil_mul(size(self, 0), 0.25)),
                    Ty::Scalar,
                )
            }
            "!_" | "@not_strictly_false" | "size" | "_<_" | "_<=_" | "_>_" | "_>=_" | "-_" => {
                (1, Ty::Scalar)
            }
            other => return Err(format!("function {other} is not in the cost model")),
        };
        Ok((own.saturating_add(arg_sum), ty))
    }

    fn is_string(&self, t: &Ty<'a>) -> bool {
        match t {
            Ty::Str(_) => true,
            Ty::Node(n, _) => n.get("type").and_then(Value::as_str) == Some("string"),
            _ => false,
        }
    }
}

/// One rule with its estimate.
#[derive(Debug)]
struct RuleCost {
    /// `openAPIV3Schema.properties[spec]...x-kubernetes-validations[i].rule`, as the API
    /// server names it.
    path: String,
    rule: String,
    /// One evaluation.
    cost: u64,
    /// How many times it can run in one object (product of the enclosing `maxItems`).
    cardinality: u64,
    /// Sized fields the rule reads that have no bound.
    unbounded: Vec<String>,
    error: Option<String>,
}

impl RuleCost {
    fn total(&self) -> u64 {
        self.cost.saturating_mul(self.cardinality)
    }
}

fn walk(
    node: &Value,
    path: &str,
    cardinality: u64,
    enclosing_unbounded: bool,
    out: &mut Vec<RuleCost>,
) {
    if let Some(rules) = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for (i, r) in rules.iter().enumerate() {
            let rule = r["rule"].as_str().unwrap_or_default().to_owned();
            let mut est = Estimator {
                vars: vec![("self".into(), Ty::Node(node, "self".into()))],
                unbounded: Vec::new(),
            };
            let parsed = cel::parser::Parser::new()
                .parse(&rule)
                .map_err(|e| format!("does not parse: {e:?}"));
            let (cost, error) = match parsed.and_then(|ast| est.cost(&ast)) {
                Ok((c, _)) => (c, None),
                Err(e) => (u64::MAX, Some(e)),
            };
            if enclosing_unbounded {
                est.unbounded
                    .push(format!("{path} (a list or map around it has no bound)"));
            }
            out.push(RuleCost {
                path: format!("{path}.x-kubernetes-validations[{i}].rule"),
                rule,
                cost,
                cardinality,
                unbounded: est.unbounded,
                error,
            });
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(
                v,
                &format!("{path}.properties[{k}]"),
                cardinality,
                enclosing_unbounded,
                out,
            );
        }
    }
    if let Some(items) = node.get("items") {
        let (n, unbounded) = match node.get("maxItems").and_then(Value::as_u64) {
            Some(n) => (n, false),
            None => (MAX_REQUEST / 2, true),
        };
        walk(
            items,
            &format!("{path}.items"),
            cardinality.saturating_mul(n),
            enclosing_unbounded || unbounded,
            out,
        );
    }
    if let Some(ap) = node.get("additionalProperties").filter(|a| a.is_object()) {
        let (n, unbounded) = match node.get("maxProperties").and_then(Value::as_u64) {
            Some(n) => (n, false),
            None => (MAX_REQUEST / 7, true),
        };
        walk(
            ap,
            &format!("{path}.additionalProperties"),
            cardinality.saturating_mul(n),
            enclosing_unbounded || unbounded,
            out,
        );
    }
}

fn costs(crd: &Value) -> Vec<RuleCost> {
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    assert!(schema.is_object(), "no openAPIV3Schema in the CRD");
    let mut out = Vec::new();
    walk(schema, "openAPIV3Schema", 1, false, &mut out);
    out
}

/// The API server's wording of how far over a budget a cost is.
fn factor(cost: u64, limit: u64) -> String {
    let f = cost as f64 / limit as f64;
    if f > 100.0 {
        "more than 100x".into()
    } else {
        format!("{f:.1}x")
    }
}

/// What the API server would refuse, in its words.
fn refusals(costs: &[RuleCost]) -> Vec<String> {
    let mut out = Vec::new();
    for r in costs {
        if let Some(e) = &r.error {
            out.push(format!("{}: cannot be estimated: {e}", r.path));
        } else if r.total() > PER_RULE_LIMIT {
            out.push(format!(
                "{}: estimated rule cost exceeds budget by factor of {}",
                r.path,
                factor(r.total(), PER_RULE_LIMIT)
            ));
        }
    }
    let total = costs.iter().fold(0u64, |s, r| s.saturating_add(r.total()));
    if total > CRD_LIMIT {
        out.push(format!(
            "openAPIV3Schema: estimated rule cost total for entire OpenAPIv3 schema exceeds budget by factor of {}",
            factor(total, CRD_LIMIT)
        ));
    }
    out
}

fn committed_crd() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../")
            .join(apiward_crds::CRD_FILE),
    )
    .unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn table(costs: &[RuleCost]) -> String {
    costs
        .iter()
        .map(|r| {
            format!(
                "{:>12} = {:>6} x {:>5}  {}\n",
                r.total(),
                r.cost,
                r.cardinality,
                r.path.trim_start_matches("openAPIV3Schema.")
            )
        })
        .collect()
}

#[test]
fn every_rule_and_the_whole_crd_fit_the_api_servers_cost_budgets() {
    let costs = costs(&committed_crd());
    assert!(
        costs.len() >= 10,
        "expected the CRD's rules, found {}",
        costs.len()
    );
    let refused = refusals(&costs);
    assert!(
        refused.is_empty(),
        "the API server would refuse the CRD:\n{}\n{}",
        refused.join("\n"),
        table(&costs)
    );
    let total: u64 = costs.iter().map(RuleCost::total).sum();
    assert!(
        total <= OWN_BUDGET,
        "the rules cost {total} in all, more than a tenth of the API server's {CRD_LIMIT}: keep CEL cheap and local, move the rest to the webhook\n{}",
        table(&costs)
    );
    for r in &costs {
        assert!(
            r.total() <= PER_RULE_LIMIT / 10,
            "{} costs {} (x{}), more than a tenth of the per-rule budget: {}",
            r.path,
            r.cost,
            r.cardinality,
            r.rule
        );
    }
    eprintln!("total {total} of {CRD_LIMIT}\n{}", table(&costs));
}

#[test]
fn every_string_list_and_map_a_rule_reads_is_bounded() {
    let costs = costs(&committed_crd());
    let unbounded: Vec<String> = costs
        .iter()
        .flat_map(|r| {
            r.unbounded
                .iter()
                .map(move |u| format!("{}: reads {u}", r.path))
        })
        .collect();
    assert!(
        unbounded.is_empty(),
        "add maxLength/maxItems/maxProperties:\n{}",
        unbounded.join("\n")
    );
}

/// The CRD of af32240, which kube-apiserver v1.28.7 refused with:
/// - `properties[spec].properties[rules].items.x-kubernetes-validations[0].rule`: more than 100x
/// - `properties[spec].x-kubernetes-validations[1].rule`: 18.8x
/// - the whole schema: more than 100x
#[test]
fn the_model_refuses_the_crd_the_api_server_refused_with_the_same_factors() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/apipolicies-af32240.yaml"),
    )
    .unwrap();
    let crd: Value = serde_norway::from_str(&text).unwrap();
    let costs = costs(&crd);
    let mut refused = refusals(&costs);
    refused.sort();
    let mut expect = [
        "openAPIV3Schema.properties[spec].properties[rules].items.x-kubernetes-validations[0].rule: estimated rule cost exceeds budget by factor of more than 100x",
        "openAPIV3Schema.properties[spec].x-kubernetes-validations[1].rule: estimated rule cost exceeds budget by factor of 18.8x",
        "openAPIV3Schema: estimated rule cost total for entire OpenAPIv3 schema exceeds budget by factor of more than 100x",
    ];
    expect.sort();
    assert_eq!(refused, expect, "\n{}", table(&costs));
}
