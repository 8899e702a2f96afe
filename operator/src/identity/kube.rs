//! The identity pieces that talk to the Kubernetes API: tokens checked with a TokenReview,
//! the CA kept in the `apiward-identity` Secret, and the trust bundle published to injected
//! namespaces as the `apiward-trust-bundle` ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use super::AUDIENCE;
use super::ca::{Ca, CaError};
use super::tokens::{ReviewFuture, ReviewedToken, TokenError, TokenReviewer};

/// The Secret holding the mesh CA (cert-manager's format), in the operator's namespace.
pub const CA_SECRET: &str = "apiward-identity";
/// The ConfigMap carrying the trust bundle (`ca.crt`) in every injected namespace.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "apiward-trust-bundle";
/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "apiward-operator";

/// Checks projected ServiceAccount tokens with the API server (TokenReview, audience
/// `apiward`).
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeTokenReviewer { .. }")
    }
}

impl KubeTokenReviewer {
    /// A reviewer using `client` (needs `create` on `tokenreviews`).
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    async fn ask(&self, token: &str) -> Result<ReviewedToken, TokenError> {
        let review = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            status: None,
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| TokenError::Unavailable(format!("TokenReview: {e}")))?;
        let status = answer
            .status
            .ok_or_else(|| TokenError::Unavailable("TokenReview: no status".into()))?;
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_default();
            return Err(if why.contains("expired") {
                TokenError::Expired
            } else if why.contains("audience") {
                TokenError::WrongAudience
            } else {
                TokenError::Invalid(if why.is_empty() {
                    "not authenticated".into()
                } else {
                    why
                })
            });
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x == AUDIENCE))
        {
            return Err(TokenError::WrongAudience);
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = name
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(TokenError::Invalid(format!(
                "{name} is not a ServiceAccount"
            )));
        };
        let pod = user
            .extra
            .as_ref()
            .and_then(|e| e.get("authentication.kubernetes.io/pod-name"))
            .and_then(|v| v.first().cloned());
        Ok(ReviewedToken {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod,
        })
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str, _now_unix: i64) -> ReviewFuture<'a> {
        Box::pin(self.ask(token))
    }
}

/// Why the CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    /// The API server refused or could not be reached.
    #[error("Secret {namespace}/{CA_SECRET}: {source}")]
    Api {
        /// The operator's namespace.
        namespace: String,
        /// Why.
        source: kube::Error,
    },
    /// The Secret exists but does not hold a usable CA.
    #[error("Secret {namespace}/{CA_SECRET}: {source}")]
    Invalid {
        /// The operator's namespace.
        namespace: String,
        /// Why.
        source: CaError,
    },
}

/// The CA from the `apiward-identity` Secret in `namespace`; on first start (no Secret) a
/// new root is generated and stored there. When two replicas race, the one that loses
/// the create loads the winner's CA.
pub async fn load_or_create_ca(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
    now_unix: i64,
) -> Result<Ca, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let api_err = |source| CaSecretError::Api {
        namespace: namespace.to_owned(),
        source,
    };
    let from = |s: Secret| {
        let data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        Ca::from_secret_data(&data).map_err(|source| CaSecretError::Invalid {
            namespace: namespace.to_owned(),
            source,
        })
    };
    if let Some(s) = api.get_opt(CA_SECRET).await.map_err(api_err)? {
        return from(s);
    }
    let ca = Ca::generate(trust_domain, now_unix).map_err(|source| CaSecretError::Invalid {
        namespace: namespace.to_owned(),
        source,
    })?;
    let secret = Secret {
        metadata: managed_meta(CA_SECRET, namespace),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            ca.to_secret_data()
                .into_iter()
                .map(|(k, v)| (k, ByteString(v)))
                .collect(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                secret = CA_SECRET,
                "identity: generated a new mesh root CA"
            );
            Ok(ca)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = api.get(CA_SECRET).await.map_err(api_err)?;
            from(s)
        }
        Err(e) => Err(api_err(e)),
    }
}

/// Name, namespace and the `app.kubernetes.io/managed-by: apiward` label of an object the
/// operator creates.
fn managed_meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_owned(),
            "apiward".to_owned(),
        )])),
        ..Default::default()
    }
}

/// The trust-bundle ConfigMap for `namespace`.
pub fn trust_bundle_configmap(namespace: &str, bundle_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: managed_meta(TRUST_BUNDLE_CONFIGMAP, namespace),
        data: Some(BTreeMap::from([(
            "ca.crt".to_owned(),
            bundle_pem.to_owned(),
        )])),
        ..Default::default()
    }
}

/// Publishes the trust bundle to `namespace` (server-side apply: idempotent, and it only
/// owns the fields it sets).
pub async fn publish_trust_bundle(
    client: kube::Client,
    namespace: &str,
    bundle_pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    api.patch(
        TRUST_BUNDLE_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(trust_bundle_configmap(namespace, bundle_pem)),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Each test is the exact sequence of API calls it expects (kube's tower-test mock).
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::json;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn mock() -> (kube::Client, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(svc, "apiward-system"), handle)
    }

    async fn body_json(req: Request<Body>) -> serde_json::Value {
        let bytes = req.into_body().collect_bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn respond(
        send: tower_test::mock::SendResponse<Response<Body>>,
        code: u16,
        v: serde_json::Value,
    ) {
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&v).unwrap()))
                .unwrap(),
        );
    }

    /// Expects one TokenReview carrying `token` for audience apiward; answers `status`.
    async fn token_review(mut handle: Handle, token: &str, status: serde_json::Value) {
        let (req, send) = handle.next_request().await.expect("a TokenReview");
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let body = body_json(req).await;
        assert_eq!(body["spec"]["token"], token);
        assert_eq!(body["spec"]["audiences"], json!(["apiward"]));
        respond(
            send,
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                   "metadata": {}, "spec": body["spec"], "status": status}),
        );
    }

    #[tokio::test]
    async fn a_token_review_names_the_service_account_and_pod() {
        let (client, handle) = mock();
        let server = tokio::spawn(token_review(
            handle,
            "tok-1",
            json!({"authenticated": true, "audiences": ["apiward"],
                   "user": {"username": "system:serviceaccount:shop:checkout",
                            "extra": {"authentication.kubernetes.io/pod-name": ["checkout-7d9"]}}}),
        ));
        let got = KubeTokenReviewer::new(client)
            .review("tok-1", 0)
            .await
            .unwrap();
        assert_eq!(
            got,
            ReviewedToken {
                namespace: "shop".into(),
                service_account: "checkout".into(),
                pod: Some("checkout-7d9".into())
            }
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn token_review_refusals_keep_their_reason() {
        let cases = [
            (
                json!({"authenticated": false, "error": "[invalid bearer token, token is expired (exp)]"}),
                TokenError::Expired,
            ),
            (
                json!({"authenticated": false, "error": "token audiences [\"kubernetes\"] is invalid for the target audiences [\"apiward\"]"}),
                TokenError::WrongAudience,
            ),
            // Authenticated, but the API server did not confirm our audience.
            (
                json!({"authenticated": true, "audiences": ["kubernetes"], "user": {"username": "system:serviceaccount:shop:checkout"}}),
                TokenError::WrongAudience,
            ),
            (
                json!({"authenticated": true, "audiences": ["apiward"], "user": {"username": "jane@example.com"}}),
                TokenError::Invalid("jane@example.com is not a ServiceAccount".into()),
            ),
        ];
        for (status, want) in cases {
            let (client, handle) = mock();
            let server = tokio::spawn(token_review(handle, "tok-2", status));
            let got = KubeTokenReviewer::new(client).review("tok-2", 0).await;
            assert_eq!(got, Err(want));
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_unreachable_api_server_is_unavailable_not_a_refusal() {
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            respond(
                send,
                503,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd down", "reason": "ServiceUnavailable", "code": 503}),
            );
        });
        let got = KubeTokenReviewer::new(client).review("tok-3", 0).await;
        assert!(matches!(got, Err(TokenError::Unavailable(_))), "{got:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn first_start_generates_the_ca_and_stores_it_then_later_starts_load_it() {
        let (client, mut handle) = mock();
        let stored = std::sync::Arc::new(std::sync::Mutex::new(serde_json::Value::Null));
        let s2 = stored.clone();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/apiward-system/secrets/apiward-identity"
            );
            respond(
                send,
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            );
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/apiward-system/secrets"
            );
            let body = body_json(req).await;
            assert_eq!(body["type"], "kubernetes.io/tls");
            for k in ["tls.crt", "tls.key", "ca.crt"] {
                assert!(body["data"][k].is_string(), "{k} missing");
            }
            *s2.lock().unwrap() = body.clone();
            respond(send, 201, body);
        });
        let first = load_or_create_ca(client, "apiward-system", "cluster.local", now())
            .await
            .unwrap();
        server.await.unwrap();

        // The next start finds the Secret and uses the same root.
        let (client, mut handle) = mock();
        let secret = stored.lock().unwrap().clone();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            respond(send, 200, secret);
        });
        let again = load_or_create_ca(client, "apiward-system", "cluster.local", now())
            .await
            .unwrap();
        server.await.unwrap();
        assert_eq!(first.trust_bundle_pem(), again.trust_bundle_pem());
    }

    #[tokio::test]
    async fn a_secret_without_a_key_is_a_clear_error() {
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            respond(
                send,
                200,
                json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "apiward-identity", "namespace": "apiward-system"},
                "data": {"tls.crt": "LS0tLQ=="}}),
            );
        });
        let err = load_or_create_ca(client, "apiward-system", "cluster.local", 0)
            .await
            .err()
            .unwrap()
            .to_string();
        server.await.unwrap();
        assert!(
            err.contains("apiward-system/apiward-identity") && err.contains("tls.key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_trust_bundle_is_server_side_applied_to_the_namespace() {
        let (client, mut handle) = mock();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PATCH);
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/shop/configmaps/apiward-trust-bundle"
            );
            let q = req.uri().query().unwrap_or_default().to_owned();
            assert!(
                q.contains("fieldManager=apiward-operator") && q.contains("force=true"),
                "{q}"
            );
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let body = body_json(req).await;
            assert_eq!(body["data"]["ca.crt"], "ROOTS");
            respond(send, 200, body);
        });
        publish_trust_bundle(client, "shop", "ROOTS").await.unwrap();
        server.await.unwrap();
    }
}
