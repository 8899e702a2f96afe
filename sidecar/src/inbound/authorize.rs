//! Stage: authorize. The engine decides on the verified facts (declared API, rules,
//! bindings, quotas); Global quotas it left pending are counted in the shared store; a
//! Delay quota waits here. (A refusal's rate-limit headers are added where it is answered.)

use std::time::{Duration, Instant};

use apiward_policy::engine::{NoTrace, Request as Facts};

use super::headers::HeaderView;
use super::pipeline::RequestCtx;
use crate::refusal::Refusal;

/// Decides into `ctx.decision`.
pub async fn stage(ctx: &mut RequestCtx<'_>, head: &http::request::Parts) -> Result<(), Refusal> {
    let decided_at = Instant::now();
    let (active, shared, engine) = (ctx.active, ctx.shared, ctx.engine);
    ctx.decision = {
        let headers = HeaderView(&head.headers);
        let facts = Facts {
            port: ctx.port_no,
            method: head.method.as_str(),
            path: head.uri.path(),
            query: head.uri.query(),
            headers: &headers,
            identity: ctx.caller.identity(ctx.info),
            source_ip: ctx.info.source.ip().to_canonical(),
            now_ms: super::now_ms(),
        };
        engine.decide(&facts, &active.quotas(shared), &mut NoTrace)
    };
    active
        .settle_quotas(shared, engine, &mut ctx.decision)
        .await;
    shared
        .metrics
        .decision_duration
        .observe(decided_at.elapsed().as_secs_f64());
    if !ctx.decision.allowed() {
        return Err(Refusal::from(ctx.decision.reason()));
    }
    if ctx.decision.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(ctx.decision.delay_ms)).await;
    }
    Ok(())
}
