use super::*;
use crate::load::{self, Object};

fn examples() -> Inputs {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
    let input = load::read(&[dir]).unwrap();
    let mut inputs = Inputs {
        trust_domain: "cluster.local".into(),
        ..Default::default()
    };
    for o in input.objects {
        match o.object {
            Object::Policy(p) => inputs.policies.push(*p),
            Object::Secret(s) => inputs.secrets.push(*s),
            Object::ConfigMap(c) => inputs.config_maps.push(*c),
        }
    }
    for (i, app) in [
        "orders",
        "users",
        "payments",
        "partner-gateway",
        "catalog",
        "unrelated",
    ]
    .iter()
    .enumerate()
    {
        for r in 0..2 {
            inputs.workloads.push(Workload {
                namespace: "shop".into(),
                name: format!("{app}-{r}"),
                labels: [("app".to_string(), app.to_string())].into(),
                service_account: app.to_string(),
                ports: vec![8080, 8443 + i as u16],
            });
        }
    }
    inputs
}

fn policy(inputs: &Inputs, name: &str) -> ApiPolicy {
    inputs
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .unwrap()
        .clone()
}

#[test]
fn same_inputs_in_any_order_give_the_same_versions() {
    let a = compile(&examples());
    let mut shuffled = examples();
    shuffled.policies.reverse();
    shuffled.workloads.reverse();
    shuffled.secrets.reverse();
    let b = compile(&shuffled);
    let versions = |o: &Output| {
        o.configs
            .iter()
            .map(|(k, c)| (k.clone(), c.version.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(versions(&a), versions(&b));
    assert_eq!(a.configs.len(), 12);
    // Every policy that selects pods is Accepted with its refs resolved.
    for (k, r) in &a.policies {
        assert!(
            r.conditions.iter().all(|c| c.status),
            "{k}: {:?}",
            r.conditions
        );
        assert_eq!(r.pods.len(), 2, "{k}");
    }
}

#[test]
fn raw_api_keys_never_reach_a_config() {
    let out = compile(&examples());
    let cfg = &out.configs["shop/partner-gateway-0"];
    let json = serde_json::to_string(cfg).unwrap();
    assert!(!json.contains("ak_live_acme_4f9c2e71d8b34a06"));
    assert!(!json.contains("ak_live_globex"));
    let p = &cfg.api_key_providers[0];
    let hk: Vec<u8> = (0..p.hmac_key.len() / 2)
        .map(|i| u8::from_str_radix(&p.hmac_key[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let acme = p.keys.iter().find(|k| k.client == "acme").unwrap();
    assert_eq!(
        acme.hash,
        hash_api_key(&hk, b"ak_live_acme_4f9c2e71d8b34a06")
    );
}

#[test]
fn policies_selecting_one_pod_merge_and_deny_stays_deny() {
    let mut inputs = examples();
    let mut extra = policy(&inputs, "users-api");
    extra.metadata.name = Some("users-lockdown".into());
    extra.spec.mode = crds::Mode::Audit;
    extra.spec.mtls = crds::MtlsMode::Permissive;
    extra.spec.rules.truncate(0);
    extra.spec.rules.push(
        serde_norway::from_str("{name: no-delete, action: Deny, to: [{methods: [DELETE]}]}")
            .unwrap(),
    );
    extra.spec.quotas.clear();
    inputs.policies.push(extra);
    let out = compile(&inputs);
    let port = out.configs["shop/users-0"]
        .ports
        .iter()
        .find(|p| p.port == 8080)
        .unwrap();
    assert_eq!(port.policies, ["shop/users-api", "shop/users-lockdown"]);
    assert_eq!(port.mtls, wire::MtlsMode::Strict, "strictest mTLS wins");
    assert_eq!(
        port.mode,
        wire::Mode::Enforce,
        "Audit only when every policy is Audit"
    );
    let deny = port.rules.iter().find(|r| r.name == "no-delete").unwrap();
    assert!(deny.audit, "rules of an Audit policy only audit");
    assert!(
        port.rules
            .iter()
            .any(|r| r.name == "own-profile" && !r.audit)
    );
}

#[test]
fn conflicting_settings_reject_one_policy_entirely() {
    let mut inputs = examples();
    let mut other = policy(&inputs, "orders-api");
    other.metadata.name = Some("zz-orders-xml".into());
    other.spec.request_limits.as_mut().unwrap().content_types = vec!["application/xml".into()];
    inputs.policies.push(other);
    let out = compile(&inputs);
    let r = &out.policies["shop/zz-orders-xml"];
    let c = r.conditions.iter().find(|c| !c.status).unwrap();
    assert_eq!((c.type_, c.reason), ("Accepted", "Conflicted"));
    assert!(c.message.contains("contentTypes"), "{}", c.message);
    for pod in ["shop/orders-0", "shop/orders-1"] {
        let port = out.configs[pod]
            .ports
            .iter()
            .find(|p| p.port == 8080)
            .unwrap();
        assert_eq!(
            port.policies,
            ["shop/orders-api"],
            "the conflicting policy is left out"
        );
        assert_eq!(port.limits.content_types, ["application/json"]);
    }
    assert!(
        out.policies["shop/orders-api"]
            .conditions
            .iter()
            .all(|c| c.status)
    );
}

#[test]
fn a_missing_secret_is_reported_and_changes_nothing() {
    let mut inputs = examples();
    inputs
        .secrets
        .retain(|s| s.metadata.name.as_deref() != Some("partner-keys"));
    let out = compile(&inputs);
    let c = out.policies["shop/partner-api"]
        .conditions
        .iter()
        .find(|c| !c.status)
        .unwrap();
    assert_eq!((c.type_, c.reason), ("ResolvedRefs", "RefNotFound"));
    assert!(
        c.message.contains("Secret shop/partner-keys"),
        "{}",
        c.message
    );
    assert!(out.configs["shop/partner-gateway-0"].ports.is_empty());
}

#[test]
fn an_invalid_policy_is_not_accepted_and_changes_no_config() {
    let inputs = examples();
    let mut c = Compiler::from_inputs(&inputs);
    let before = c.configs().clone();
    let mut bad = policy(&inputs, "users-api");
    bad.spec.rules[0].to[0].paths = vec!["/users/{id}".into()];
    let changed = c.upsert_policy(bad);
    assert!(changed.is_empty());
    let r = &c.policy_results()["shop/users-api"];
    let cond = r.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
    assert!(!cond.status);
    assert!(
        cond.message.contains("spec.rules[0].bind"),
        "{}",
        cond.message
    );
    // The pods keep enforcing the last good version: nothing was half-applied.
    assert_eq!(
        c.configs()["shop/users-0"].ports,
        before["shop/users-0"].ports
    );
}

#[test]
fn incremental_updates_touch_only_selected_pods_and_match_a_full_compile() {
    let mut inputs = examples();
    let mut c = Compiler::from_inputs(&inputs);
    let mut p = policy(&inputs, "payments");
    p.spec.quotas[0].limit.requests = 99;
    let changed = c.upsert_policy(p.clone());
    assert_eq!(changed, ["shop/payments-0", "shop/payments-1"]);
    inputs
        .policies
        .retain(|x| x.metadata.name.as_deref() != Some("payments"));
    inputs.policies.push(p);
    let full = compile(&inputs);
    assert_eq!(c.configs(), &full.configs);
    // A new pod picks up the policies that select it; removing a policy frees its pods.
    let changed = c.upsert_workload(Workload {
        namespace: "shop".into(),
        name: "users-2".into(),
        labels: [("app".to_string(), "users".to_string())].into(),
        service_account: "users".into(),
        ports: vec![8080],
    });
    assert_eq!(changed, ["shop/users-2"]);
    assert_eq!(
        c.configs()["shop/users-2"].ports[0].policies,
        ["shop/users-api"]
    );
    let changed = c.remove_policy("shop", "users-api");
    assert_eq!(changed, ["shop/users-0", "shop/users-1", "shop/users-2"]);
    assert!(c.configs()["shop/users-2"].ports.is_empty());
}

#[test]
fn global_quotas_fail_open_unless_critical_or_told_otherwise() {
    let store_error = |edit: fn(&mut crds::Quota)| {
        let mut inputs = examples();
        let p = inputs
            .policies
            .iter_mut()
            .find(|p| p.metadata.name.as_deref() == Some("partner-api"))
            .unwrap();
        let q = p
            .spec
            .quotas
            .iter_mut()
            .find(|q| q.name == "partner-daily")
            .unwrap();
        edit(q);
        let out = compile(&inputs);
        let cfg = &out.configs["shop/partner-gateway-0"];
        let q = cfg
            .ports
            .iter()
            .flat_map(|p| &p.quotas)
            .find(|q| q.name == "partner-daily");
        let q = q.unwrap();
        assert_eq!(q.scope, wire::QuotaScope::Global);
        q.on_store_error
    };
    assert_eq!(
        store_error(|q| q.on_store_error = None),
        wire::OnStoreError::FailOpen
    );
    assert_eq!(
        store_error(|q| {
            q.on_store_error = None;
            q.critical = true;
        }),
        wire::OnStoreError::FailClosed
    );
    assert_eq!(
        store_error(|q| {
            q.on_store_error = Some(crds::OnStoreError::FailOpen);
            q.critical = true;
        }),
        wire::OnStoreError::FailOpen,
        "an explicit choice wins over critical"
    );
}

#[test]
fn unfilterable_refusal_is_a_required_feature() {
    let out = compile(&examples());
    let mut seen = 0;
    for cfg in out.configs.values() {
        let refuses = cfg.ports.iter().any(|p| {
            !p.response.remove_fields.is_empty()
                && p.response.on_unfilterable == wire::OnUnfilterable::Refuse
        });
        assert_eq!(
            cfg.requires
                .iter()
                .any(|f| f == "responseFilter.onUnfilterable"),
            refuses,
            "{}",
            cfg.workload.name
        );
        seen += usize::from(refuses);
        // Whatever a config requires, this release's sidecar implements.
        cfg.check_version().unwrap();
    }
    assert!(seen > 0, "the examples filter responses somewhere");
}
