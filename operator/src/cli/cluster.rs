//! The live cluster as a source for `apiward check --cluster`, `explain --cluster` and
//! `inventory` (without `--local`): the ApiPolicies in force (one namespace, or all) and
//! only the Secrets and ConfigMaps they reference, read with the kubeconfig kubectl uses.
//! Objects are named `cluster/<namespace>/<name>` in findings.

use std::collections::BTreeSet;
use std::path::PathBuf;

use apiward_crds::ApiPolicy;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::ListParams;

use crate::load::{Input, Loaded, Object, Origin};

fn origin(kind: &str, ns: &str, name: &str) -> Origin {
    Origin {
        file: PathBuf::from(format!("cluster/{kind}/{ns}/{name}")),
        document: 0,
    }
}

/// The ApiPolicies of `namespace` (all namespaces when `None`).
pub async fn policies(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<Vec<ApiPolicy>, String> {
    let api: Api<ApiPolicy> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot list ApiPolicies: {e}"))?;
    Ok(list.items)
}

/// The policies and what they reference, as `check`/`explain` read files. A referenced
/// object that does not exist is left out (the compiler then reports it, as it would for
/// files).
pub async fn read(client: &kube::Client, namespace: Option<&str>) -> Result<Input, String> {
    let mut input = Input::default();
    let policies = policies(client, namespace).await?;
    let mut secrets = BTreeSet::new();
    let mut config_maps = BTreeSet::new();
    for p in &policies {
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        secrets.extend(crate::compile::referenced_secrets(p).map(|s| (ns.clone(), s.to_owned())));
        config_maps
            .extend(crate::compile::referenced_config_map(p).map(|m| (ns.clone(), m.to_owned())));
    }
    for p in policies {
        let (ns, name) = (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        );
        input.objects.push(Loaded {
            origin: origin("apipolicies", &ns, &name),
            object: Object::Policy(Box::new(p)),
        });
        input.files += 1;
    }
    for (ns, name) in secrets {
        if let Some(s) = get::<Secret>(client, &ns, &name).await? {
            input.objects.push(Loaded {
                origin: origin("secrets", &ns, &name),
                object: Object::Secret(Box::new(s)),
            });
        }
    }
    for (ns, name) in config_maps {
        if let Some(m) = get::<ConfigMap>(client, &ns, &name).await? {
            input.objects.push(Loaded {
                origin: origin("configmaps", &ns, &name),
                object: Object::ConfigMap(Box::new(m)),
            });
        }
    }
    Ok(input)
}

/// One namespaced object, if it exists.
async fn get<K>(client: &kube::Client, ns: &str, name: &str) -> Result<Option<K>, String>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read {kind} {ns}/{name}: {e}"))
}

/// Runs `f` with a client for the kubeconfig (as kubectl finds it), on the CLI's runtime.
pub fn with_client<T>(f: impl AsyncFnOnce(kube::Client) -> Result<T, String>) -> Result<T, String> {
    super::runtime()?.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no cluster: {e} (KUBECONFIG or ~/.kube/config, as kubectl)"))?;
        f(client).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    /// The mock API server answers exactly: the policy list of `shop`, then the one
    /// Secret the policy references (and 404 for the ConfigMap, which does not exist).
    #[tokio::test]
    async fn a_namespace_is_read_with_only_what_its_policies_reference() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("the policy list");
            assert_eq!(
                req.uri().path(),
                "/apis/apiward.io/v1alpha1/namespaces/shop/apipolicies"
            );
            let policy: serde_json::Value =
                serde_norway::from_str(include_str!("../../../examples/shop/partner-api.yaml"))
                    .unwrap();
            let list = json!({"apiVersion": "apiward.io/v1alpha1", "kind": "ApiPolicyList", "metadata": {}, "items": [policy]});
            send.send_response(
                Response::builder()
                    .body(Body::from(list.to_string().into_bytes()))
                    .unwrap(),
            );
            let mut seen = vec![];
            while let Some((req, send)) = handle.next_request().await {
                let path = req.uri().path().to_owned();
                let answer = if path == "/api/v1/namespaces/shop/secrets/partner-keys" {
                    Response::builder().body(Body::from(
                        json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "partner-keys", "namespace": "shop"},
                        "data": {"acme": "YWNtZS1rZXktMTIzNDU2Nzg5MDEyMzQ1Njc4OTA="}})
                        .to_string()
                        .into_bytes(),
                    ))
                } else {
                    Response::builder().status(404).body(Body::from(
                        json!({"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "reason": "NotFound", "code": 404})
                        .to_string()
                        .into_bytes(),
                    ))
                };
                send.send_response(answer.unwrap());
                seen.push(path);
            }
            seen
        });
        let input = read(&client, Some("shop")).await.unwrap();
        drop(client);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            ["/api/v1/namespaces/shop/secrets/partner-keys"],
            "no other Secret is read"
        );
        let kinds: Vec<String> = input
            .objects
            .iter()
            .map(|o| {
                format!(
                    "{} {}",
                    o.origin.file.display(),
                    matches!(o.object, Object::Secret(_))
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "cluster/apipolicies/shop/partner-api false",
                "cluster/secrets/shop/partner-keys true"
            ]
        );
    }
}
