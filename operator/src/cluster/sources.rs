//! The kube watches: `ApiPolicy`, `Pod`, `Secret`, `ConfigMap` and `Service` in every namespace,
//! turned into calls on the [`ClusterIndex`] (and nothing else). After each batch of
//! events the compiler's output for the pods that changed is published into the
//! [`ConfigHub`], which pushes it to their sidecars; so is the mesh table (Services and
//! the injected pods behind them), once both have been listed.
//!
//! A watch that fails is retried with kube's default backoff; after a restart the watch
//! relists, and objects missing from the relist are deleted from the index. Referenced
//! Secrets and ConfigMaps the index has not seen are fetched once; later changes arrive by
//! the watch.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use apiward_crds::ApiPolicy;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;

use super::metrics::OperatorMetrics;
use crate::index::{Applied, ClusterIndex, RefKind, ns_name};
use crate::serve::config::ConfigHub;

/// One event of one of the watches.
#[derive(Debug)]
pub enum SourceEvent {
    /// An `ApiPolicy` watch event.
    Policy(Box<Event<ApiPolicy>>),
    /// A `Pod` watch event.
    Pod(Box<Event<Pod>>),
    /// A `Secret` watch event.
    Secret(Box<Event<Secret>>),
    /// A `ConfigMap` watch event.
    ConfigMap(Box<Event<ConfigMap>>),
    /// A `Service` watch event (the mesh table).
    Service(Box<Event<Service>>),
}

/// Applies one event to the index.
pub fn apply(index: &mut ClusterIndex, ev: SourceEvent) -> Applied {
    match ev {
        SourceEvent::Policy(e) => match *e {
            Event::Init => {
                index.policies_relisting();
                Applied::default()
            }
            Event::InitApply(p) | Event::Apply(p) => index.apply_policy(p),
            Event::Delete(p) => {
                let (ns, name) = ns_name(&p.metadata);
                index.delete_policy(&ns, &name)
            }
            Event::InitDone => index.policies_listed(),
        },
        SourceEvent::Pod(e) => match *e {
            Event::Init => {
                index.pods_relisting();
                Applied::default()
            }
            Event::InitApply(p) | Event::Apply(p) => index.apply_pod(&p),
            Event::Delete(p) => {
                let (ns, name) = ns_name(&p.metadata);
                index.delete_pod(&ns, &name)
            }
            Event::InitDone => index.pods_listed(),
        },
        SourceEvent::Secret(e) => match *e {
            Event::InitApply(s) | Event::Apply(s) => index.apply_secret(s),
            Event::Delete(s) => {
                let (ns, name) = ns_name(&s.metadata);
                index.delete_secret(&ns, &name)
            }
            Event::Init | Event::InitDone => Applied::default(),
        },
        SourceEvent::ConfigMap(e) => match *e {
            Event::InitApply(m) | Event::Apply(m) => index.apply_config_map(m),
            Event::Delete(m) => {
                let (ns, name) = ns_name(&m.metadata);
                index.delete_config_map(&ns, &name)
            }
            Event::Init | Event::InitDone => Applied::default(),
        },
        SourceEvent::Service(e) => {
            match *e {
                Event::Init => index.services_relisting(),
                Event::InitApply(s) | Event::Apply(s) => index.apply_service(&s),
                Event::Delete(s) => {
                    let (ns, name) = ns_name(&s.metadata);
                    index.delete_service(&ns, &name);
                }
                Event::InitDone => index.services_listed(),
            }
            Applied::default()
        }
    }
}

/// The merged watch streams of a cluster.
pub fn watches(client: &Client) -> futures::stream::BoxStream<'static, SourceEvent> {
    futures::stream::select_all([
        watch_all::<ApiPolicy>(client, SourceEvent::Policy),
        watch_all::<Pod>(client, SourceEvent::Pod),
        watch_all::<Secret>(client, SourceEvent::Secret),
        watch_all::<ConfigMap>(client, SourceEvent::ConfigMap),
        watch_all::<Service>(client, SourceEvent::Service),
    ])
    .boxed()
}

/// One kind, in every namespace, retried with kube's default backoff (failures logged).
fn watch_all<K>(
    client: &Client,
    wrap: fn(Box<Event<K>>) -> SourceEvent,
) -> futures::stream::BoxStream<'static, SourceEvent>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .filter_map(move |e| {
            let event = log_err(&kind, e).map(|e| wrap(Box::new(e)));
            async move { event }
        })
        .boxed()
}

fn log_err<K>(kind: &str, e: watcher::Result<Event<K>>) -> Option<Event<K>> {
    match e {
        Ok(e) => Some(e),
        Err(err) => {
            tracing::warn!(kind, error = %err, "watch failed; retrying with backoff");
            None
        }
    }
}

/// Most events applied before the changes are published.
const BATCH: usize = 1024;

/// Applies events until the stream ends: each batch (what is ready at once, up to
/// [`BATCH`]) is applied, then published; `changed` ticks when a policy's status inputs
/// changed.
pub async fn run(
    client: Client,
    mut events: futures::stream::BoxStream<'static, SourceEvent>,
    index: Arc<Mutex<ClusterIndex>>,
    hub: Arc<ConfigHub>,
    changed: watch::Sender<u64>,
    metrics: Arc<OperatorMetrics>,
) {
    let mut asked: BTreeSet<(RefKind, String, String)> = BTreeSet::new();
    let (mut policies_listed, mut pods_listed, mut services_listed) = (false, false, false);
    while let Some(first) = events.next().await {
        let started = Instant::now();
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match events.next().now_or_never() {
                Some(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        let span = tracing::info_span!(
            "apply_watch_events",
            events = batch.len(),
            pods_changed = tracing::field::Empty
        );
        // The span covers the synchronous part only (no await inside).
        let (pods, policies, missing) = span.in_scope(|| {
            let mut index = index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut pods = 0;
            let mut policies = false;
            for ev in batch {
                metrics.events.inc();
                policies_listed |=
                    matches!(&ev, SourceEvent::Policy(e) if matches!(**e, Event::InitDone));
                pods_listed |= matches!(&ev, SourceEvent::Pod(e) if matches!(**e, Event::InitDone));
                services_listed |=
                    matches!(&ev, SourceEvent::Service(e) if matches!(**e, Event::InitDone));
                let a = apply(&mut index, ev);
                pods += a.pods.len();
                policies |= a.policies || !a.pods.is_empty();
            }
            let pushed = if pods > 0 || policies {
                hub.publish(&index.workloads(), index.compiler().configs())
            } else {
                0
            };
            metrics.pushes.inc_by(pushed as u64);
            if pods_listed
                && services_listed
                && let Some(table) = index.take_mesh_table()
                && hub.publish_mesh(&table)
            {
                tracing::info!(
                    version = table.version,
                    services = table.destinations.len(),
                    "mesh table published"
                );
            }
            (pushed, policies, index.missing_refs())
        });
        span.record("pods_changed", pods);
        metrics
            .compile_seconds
            .observe(started.elapsed().as_secs_f64());
        if policies_listed && pods_listed {
            metrics
                .ready
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if pods > 0 {
            tracing::info!(pods_changed = pods, "configs published");
        }
        let mut fetched = Vec::new();
        for r in missing {
            if asked.insert(r.clone()) {
                match fetch(&client, &r).await {
                    Ok(found) => fetched.extend(found),
                    // Asked again after the next batch.
                    Err(_) => {
                        asked.remove(&r);
                    }
                }
            }
        }
        if !fetched.is_empty() {
            let mut index = index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let pods: usize = fetched
                .into_iter()
                .map(|ev| apply(&mut index, ev).pods.len())
                .sum();
            if pods > 0 {
                let pushed = hub.publish(&index.workloads(), index.compiler().configs());
                metrics.pushes.inc_by(pushed as u64);
            }
        }
        if policies {
            changed.send_modify(|n| *n += 1);
        }
    }
}

async fn fetch(
    client: &Client,
    (kind, ns, name): &(RefKind, String, String),
) -> Result<Option<SourceEvent>, kube::Error> {
    let got = match kind {
        RefKind::Secret => Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .map(|s| s.map(|s| SourceEvent::Secret(Box::new(Event::Apply(s))))),
        RefKind::ConfigMap => Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await
            .map(|m| m.map(|m| SourceEvent::ConfigMap(Box::new(Event::Apply(m))))),
    };
    if let Err(e) = &got {
        tracing::warn!(?kind, namespace = %ns, name, error = %e, "cannot read a referenced object");
    }
    got
}
