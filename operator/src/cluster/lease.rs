//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go's
//! leaderelection does it: the holder renews `renewTime` every [`LeaseConfig::renew`];
//! another replica takes the Lease over only once it has not been renewed for
//! [`LeaseConfig::duration`]. Every write carries the `resourceVersion` it read, so two
//! replicas racing for an expired Lease cannot both win (the loser gets 409).
//!
//! Only the leader writes status and publishes trust bundles; standby replicas keep their
//! index warm and serve configs and certificates.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease's name (`apiward-operator`).
    pub name: String,
    /// Its namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a standby retries).
    pub renew: Duration,
}

impl LeaseConfig {
    /// Defaults: 15 s lease, renewed every 5 s.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            name: "apiward-operator".into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }
}

fn held_until(spec: &LeaseSpec) -> Option<Timestamp> {
    let renewed = spec.renew_time.as_ref()?.0;
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    renewed.checked_add(SignedDuration::from_secs(secs)).ok()
}

/// One round: takes, keeps or leaves the Lease. Returns whether we hold it now.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(mine(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    let new_spec = match holder {
        Some(h) if h == cfg.identity => mine(
            spec.lease_transitions.unwrap_or(0),
            spec.acquire_time.clone(),
        ),
        Some(_) if held_until(&spec).is_some_and(|t| t > now) => return Ok(false),
        // Free, or expired: take it over.
        _ => mine(spec.lease_transitions.unwrap_or(0) + 1, None),
    };
    lease.spec = Some(new_spec);
    // `lease.metadata.resourceVersion` is the one read: a concurrent write makes this 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Keeps trying to lead until the process ends; `leader` says whether we do. A leader that
/// cannot renew for a whole lease duration steps down (another replica may have taken
/// over by then).
pub async fn run(api: Api<Lease>, cfg: LeaseConfig, leader: watch::Sender<bool>) {
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &cfg, Timestamp::now()).await {
            Ok(held) => {
                if held {
                    last_renewed = Some(tokio::time::Instant::now());
                }
                if *leader.borrow() != held {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.name, leader = held, "leadership changed");
                }
                leader.send_if_modified(|l| std::mem::replace(l, held) != held);
            }
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "cannot read or renew the lease");
                if last_renewed.is_some_and(|t| t.elapsed() >= cfg.duration) {
                    leader.send_if_modified(|l| std::mem::replace(l, false));
                }
            }
        }
        tokio::time::sleep(cfg.renew).await;
    }
}

#[cfg(test)]
mod tests {
    //! Each test is the exact sequence of API calls it expects (kube's tower-test mock).
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::json;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/apiward-system/leases";

    fn api() -> (Api<Lease>, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "apiward-system");
        (Api::namespaced(client, "apiward-system"), handle)
    }

    fn respond(
        send: tower_test::mock::SendResponse<Response<Body>>,
        code: u16,
        body: serde_json::Value,
    ) {
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(body.to_string().into_bytes()))
                .unwrap(),
        );
    }

    fn not_found() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
    }

    fn lease(holder: &str, renewed: Timestamp, transitions: i32) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "apiward-operator", "namespace": "apiward-system", "resourceVersion": "41"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": MicroTime(renewed), "acquireTime": MicroTime(renewed),
                     "leaseTransitions": transitions}
        })
    }

    async fn body(req: Request<Body>) -> serde_json::Value {
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap()
    }

    fn cfg() -> LeaseConfig {
        LeaseConfig::new("apiward-system", "operator-a")
    }

    #[tokio::test]
    async fn no_lease_is_created_and_held() {
        let (api, mut handle) = api();
        let now = Timestamp::now();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                (req.method(), req.uri().path()),
                (&Method::GET, &*format!("{PATH}/apiward-operator"))
            );
            respond(send, 404, not_found());
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!((req.method(), req.uri().path()), (&Method::POST, PATH));
            let b = body(req).await;
            assert_eq!(b["spec"]["holderIdentity"], "operator-a");
            assert_eq!(b["spec"]["leaseDurationSeconds"], 15);
            respond(send, 201, b);
        });
        assert!(try_acquire_or_renew(&api, &cfg(), now).await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_lease_another_replica_renews_is_left_alone() {
        let (api, mut handle) = api();
        let now = Timestamp::now();
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::GET);
            respond(
                send,
                200,
                lease("operator-b", now - SignedDuration::from_secs(3), 4),
            );
            // No write follows: the mock would see it.
            assert!(
                tokio::time::timeout(Duration::from_millis(200), handle.next_request())
                    .await
                    .is_err()
            );
        });
        assert!(!try_acquire_or_renew(&api, &cfg(), now).await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_with_the_version_read() {
        let (api, mut handle) = api();
        let now = Timestamp::now();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            respond(
                send,
                200,
                lease("operator-b", now - SignedDuration::from_secs(60), 4),
            );
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                (req.method(), req.uri().path()),
                (&Method::PUT, &*format!("{PATH}/apiward-operator"))
            );
            let b = body(req).await;
            assert_eq!(
                b["metadata"]["resourceVersion"], "41",
                "optimistic concurrency"
            );
            assert_eq!(b["spec"]["holderIdentity"], "operator-a");
            assert_eq!(b["spec"]["leaseTransitions"], 5);
            respond(send, 200, b);
        });
        assert!(try_acquire_or_renew(&api, &cfg(), now).await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn losing_the_race_for_an_expired_lease_is_not_leading() {
        let (api, mut handle) = api();
        let now = Timestamp::now();
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            respond(
                send,
                200,
                lease("operator-b", now - SignedDuration::from_secs(60), 4),
            );
            let (_, send) = handle.next_request().await.unwrap();
            respond(
                send,
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
            );
        });
        assert!(!try_acquire_or_renew(&api, &cfg(), now).await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_holder_renews_keeping_its_acquire_time() {
        let (api, mut handle) = api();
        let now = Timestamp::now();
        let acquired = now - SignedDuration::from_secs(5);
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            respond(send, 200, lease("operator-a", acquired, 2));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::PUT);
            let b = body(req).await;
            assert_eq!(b["spec"]["leaseTransitions"], 2);
            assert_eq!(b["spec"]["acquireTime"], json!(MicroTime(acquired)));
            assert_eq!(b["spec"]["renewTime"], json!(MicroTime(now)));
            respond(send, 200, b);
        });
        assert!(try_acquire_or_renew(&api, &cfg(), now).await.unwrap());
        server.await.unwrap();
    }
}
