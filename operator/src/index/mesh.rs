//! The mesh table from Services and the injected pods behind them (pure).
//!
//! A Service is meshed when it has a cluster IP and a selector, selects at least one
//! running pod, and every running pod it selects was injected (`apiward.io/status:
//! injected`): then every connection kube-proxy may balance to lands on a sidecar. Its
//! ports whose target is the port the pods' sidecars front are listed, with the SPIFFE IDs
//! of the selected pods' ServiceAccounts. A Service with any pod outside the mesh is left
//! out: calls to it stay plaintext (and pass the caller's egress policy).

use std::collections::{BTreeMap, BTreeSet};

use apiward_policy::mesh::{MESH_API_VERSION, MeshDestination, MeshTable};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::labels::{Selector, SelectorExt};

use crate::serve::webhook::{STATUS_ANNOTATION, app_port};

#[derive(Debug, Clone, PartialEq)]
struct ServiceFacts {
    cluster_ips: Vec<String>,
    selector: BTreeMap<String, String>,
    /// (port, target, opaque)
    ports: Vec<(u16, IntOrString, bool)>,
}

#[derive(Debug, Clone, PartialEq)]
struct PodFacts {
    labels: BTreeMap<String, String>,
    service_account: String,
    injected: bool,
    /// The port its sidecar fronts.
    app_port: Option<u16>,
    /// Named container ports.
    named: BTreeMap<String, u16>,
}

/// Services and pods as far as the mesh table needs them, per namespace.
#[derive(Debug, Default)]
pub struct MeshIndex {
    services: BTreeMap<(String, String), ServiceFacts>,
    pods: BTreeMap<(String, String), PodFacts>,
}

fn service_facts(s: &Service) -> Option<ServiceFacts> {
    let spec = s.spec.as_ref()?;
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if let Some(ip) = &spec.cluster_ip
        && !ips.contains(ip)
    {
        ips.push(ip.clone());
    }
    ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok()); // "None": headless
    let selector = spec.selector.clone().unwrap_or_default();
    if ips.is_empty() || selector.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
            let opaque = p
                .app_protocol
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case("tcp"))
                || p.name
                    .as_deref()
                    .is_some_and(|n| n == "tcp" || n.starts_with("tcp-"));
            Some((port, target, opaque))
        })
        .collect();
    Some(ServiceFacts {
        cluster_ips: ips,
        selector,
        ports,
    })
}

fn pod_facts(p: &Pod) -> Option<PodFacts> {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = p.spec.as_ref()?;
    let named = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|cp| Some((cp.name.clone()?, u16::try_from(cp.container_port).ok()?)))
        .collect();
    Some(PodFacts {
        labels: p.metadata.labels.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        injected: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATUS_ANNOTATION))
            .is_some_and(|v| v == "injected"),
        app_port: app_port(p),
        named,
    })
}

impl MeshIndex {
    /// Adds or replaces a Service; whether the table's inputs changed.
    pub fn apply_service(&mut self, s: &Service) -> bool {
        let k = super::ns_name(&s.metadata);
        match service_facts(s) {
            Some(f) => self.services.insert(k, f.clone()) != Some(f),
            None => self.services.remove(&k).is_some(),
        }
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        self.services
            .remove(&(namespace.to_owned(), name.to_owned()))
            .is_some()
    }

    /// Adds or replaces a pod (a finished one is removed).
    pub fn apply_pod(&mut self, p: &Pod) -> bool {
        let k = super::ns_name(&p.metadata);
        match pod_facts(p) {
            Some(f) => self.pods.insert(k, f.clone()) != Some(f),
            None => self.pods.remove(&k).is_some(),
        }
    }

    /// Removes a pod.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> bool {
        self.pods
            .remove(&(namespace.to_owned(), name.to_owned()))
            .is_some()
    }

    /// The Services known, as `(namespace, name)`.
    pub fn service_keys(&self) -> Vec<(String, String)> {
        self.services.keys().cloned().collect()
    }

    /// The table for `trust_domain`.
    pub fn table(&self, trust_domain: &str) -> MeshTable {
        let mut destinations = Vec::new();
        for ((ns, name), svc) in &self.services {
            let Ok(selector) = Selector::try_from(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some(svc.selector.clone()),
                    match_expressions: None,
                },
            ) else {
                continue;
            };
            let pods: Vec<&PodFacts> = self
                .pods
                .range((ns.clone(), String::new())..)
                .take_while(|((pns, _), _)| pns == ns)
                .map(|(_, p)| p)
                .filter(|p| selector.matches(&p.labels))
                .collect();
            if pods.is_empty() || pods.iter().any(|p| !p.injected) {
                continue;
            }
            let mut ports = BTreeSet::new();
            let mut opaque = false;
            for (port, target, tcp) in &svc.ports {
                let reaches_sidecar = pods.iter().all(|p| {
                    let t = match target {
                        IntOrString::Int(n) => u16::try_from(*n).ok(),
                        IntOrString::String(n) => p.named.get(n).copied(),
                    };
                    t.is_some() && t == p.app_port
                });
                if reaches_sidecar {
                    ports.insert(*port);
                    opaque |= tcp;
                }
            }
            if ports.is_empty() {
                continue;
            }
            let identities: BTreeSet<String> = pods
                .iter()
                .map(|p| format!("spiffe://{trust_domain}/ns/{ns}/sa/{}", p.service_account))
                .collect();
            destinations.push(MeshDestination {
                service: format!("{ns}/{name}"),
                cidrs: svc
                    .cluster_ips
                    .iter()
                    .map(|ip| {
                        if ip.contains(':') {
                            format!("{ip}/128")
                        } else {
                            format!("{ip}/32")
                        }
                    })
                    .collect(),
                ports: ports.into_iter().collect(),
                identities: identities.into_iter().collect(),
                opaque,
            });
        }
        let version = {
            use sha2::Digest as _;
            let body = serde_json::to_vec(&destinations).unwrap_or_default();
            let hash = sha2::Sha256::digest(&body);
            format!(
                "mesh-{}",
                hash.iter()
                    .take(8)
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        };
        MeshTable {
            api_version: MESH_API_VERSION.into(),
            version,
            destinations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, app: &str, sa: &str, injected: bool) -> Pod {
        let mut annotations = serde_json::Map::new();
        if injected {
            annotations.insert(STATUS_ANNOTATION.into(), "injected".into());
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}, "annotations": annotations},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app",
                     "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}]}]},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn service(name: &str, app: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "selector": {"app": app}, "ports": ports},
        }))
        .unwrap()
    }

    #[test]
    fn a_service_whose_pods_all_run_sidecars_is_meshed_on_the_ports_that_reach_them() {
        let mut m = MeshIndex::default();
        m.apply_pod(&pod("orders-0", "orders", "orders", true));
        m.apply_pod(&pod("orders-1", "orders", "orders-v2", true));
        m.apply_service(&service(
            "orders",
            "orders",
            json!([{"name": "http", "port": 80, "targetPort": "http"},
                   {"name": "admin", "port": 9090, "targetPort": 9090}]),
        ));
        let t = m.table("cluster.local");
        assert_eq!(t.api_version, MESH_API_VERSION);
        assert_eq!(
            t.destinations,
            vec![MeshDestination {
                service: "shop/orders".into(),
                cidrs: vec!["10.96.0.20/32".into()],
                ports: vec![80],
                identities: vec![
                    "spiffe://cluster.local/ns/shop/sa/orders".into(),
                    "spiffe://cluster.local/ns/shop/sa/orders-v2".into()
                ],
                opaque: false,
            }],
            "9090 reaches the app directly (not intercepted): not meshed"
        );
    }

    #[test]
    fn a_service_with_a_pod_outside_the_mesh_is_left_out_and_comes_back_when_it_is_gone() {
        let mut m = MeshIndex::default();
        m.apply_pod(&pod("users-0", "users", "users", true));
        m.apply_pod(&pod("users-1", "users", "users", false));
        m.apply_service(&service("users", "users", json!([{"port": 8080}])));
        let before = m.table("cluster.local");
        assert!(before.destinations.is_empty());
        assert!(m.delete_pod("shop", "users-1"));
        let after = m.table("cluster.local");
        assert_eq!(after.destinations.len(), 1);
        assert_ne!(before.version, after.version);
        // The same inputs give the same version; an unrelated change is not a change.
        assert_eq!(m.table("cluster.local").version, after.version);
        assert!(!m.apply_pod(&pod("users-0", "users", "users", true)));
    }

    #[test]
    fn headless_services_selectorless_services_and_finished_pods_are_not_meshed() {
        let mut m = MeshIndex::default();
        m.apply_pod(&pod("db-0", "db", "db", true));
        let mut headless = service("db", "db", json!([{"port": 8080}]));
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        headless.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        assert!(!m.apply_service(&headless));
        let mut external = service("ext", "db", json!([{"port": 8080}]));
        external.spec.as_mut().unwrap().selector = None;
        m.apply_service(&external);
        assert!(m.table("cluster.local").destinations.is_empty());

        m.apply_service(&service(
            "db",
            "db",
            json!([{"name": "tcp-pg", "port": 8080}]),
        ));
        let t = m.table("cluster.local");
        assert!(
            t.destinations[0].opaque,
            "a tcp- port is tunnelled as opaque TCP"
        );
        let mut done = pod("db-0", "db", "db", true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(m.apply_pod(&done));
        assert!(m.table("cluster.local").destinations.is_empty());
    }
}
