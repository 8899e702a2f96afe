//! Every rule of the decision, one test each, through the `test-util` builders.

use serde_json::json;

use crate::config::{PortPolicy, QuotaConfig, QuotaKey, RuleConfig, SidecarConfig, Source};
use crate::config::{UndeclaredAction, Window};
use crate::engine::{Decision, Reason, Verdict};
use crate::quota::LocalQuotas;
use crate::test_util::TestRequest;

fn engine(port: PortPolicy) -> super::Engine {
    SidecarConfig::test().port(port).engine()
}

fn decide<'e>(e: &'e super::Engine, r: &TestRequest) -> Decision<'e> {
    r.decide(e, &LocalQuotas::new(64))
}

fn rule_name<'e>(d: &Decision<'e>) -> Option<&'e str> {
    d.rule.map(|r| r.name)
}

// --- default deny -------------------------------------------------------------------

#[test]
fn a_selected_port_without_rules_refuses_everything() {
    let e = engine(PortPolicy::test(8080));
    let d = decide(&e, &TestRequest::get("/anything").peer("default", "web"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::NoMatchingRule));
    assert_eq!(d.status(), 403);
    assert_eq!(d.label(), "deny");
}

#[test]
fn an_allow_rule_allows_only_its_operation() {
    let e = engine(
        PortPolicy::test(8080).rule(RuleConfig::allow("read-users").to(&["GET"], &["/users/{id}"])),
    );
    let ok = decide(&e, &TestRequest::get("/users/7"));
    assert_eq!(ok.verdict, Verdict::Allow);
    assert_eq!(ok.reason(), Reason::Allowed);
    assert_eq!(rule_name(&ok), Some("read-users"));
    assert_eq!(ok.template, Some("/users/{id}"));
    for r in [
        TestRequest::new("POST", "/users/7"),
        TestRequest::get("/users/7/orders"),
        TestRequest::get("/orders/7"),
    ] {
        let d = decide(&e, &r);
        assert_eq!(d.verdict, Verdict::Deny(Reason::NoMatchingRule), "{r:?}");
    }
}

#[test]
fn a_port_no_policy_selects_is_allowed_as_no_policy() {
    let e = engine(PortPolicy::test(8080));
    let mut r = TestRequest::get("/x");
    r.port = 9090;
    let d = decide(&e, &r);
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.reason(), Reason::NoPolicy);
    assert_eq!(d.label(), "allow");
}

#[test]
fn an_anonymous_caller_refused_by_rules_that_need_an_identity_is_told_to_authenticate() {
    let e = engine(
        PortPolicy::test(8080).rule(
            RuleConfig::allow("members")
                .to(&[], &["/me"])
                .from(Source::jwt("default/test/idp", &[])),
        ),
    );
    let d = decide(&e, &TestRequest::get("/me"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::Unauthenticated));
    assert_eq!(d.status(), 401);
    // An identified caller that does not match is refused, not asked to authenticate.
    let d = decide(&e, &TestRequest::get("/me").peer("default", "web"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::NoMatchingRule));
}

// --- deny wins ----------------------------------------------------------------------

#[test]
fn a_matching_deny_rule_wins_over_an_allow_rule_listed_before_it() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .rule(RuleConfig::deny("no-deletes").to(&["DELETE"], &[])),
    );
    assert!(decide(&e, &TestRequest::get("/users/1")).allowed());
    let d = decide(&e, &TestRequest::new("DELETE", "/users/1"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::DeniedByRule));
    assert_eq!(rule_name(&d), Some("no-deletes"));
    assert_eq!(d.status(), 403);
}

#[test]
fn a_deny_rule_applies_only_to_the_callers_it_names() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .rule(RuleConfig::deny("not-batch").from(Source::service_account("jobs", "batch"))),
    );
    assert!(decide(&e, &TestRequest::get("/x").peer("default", "web")).allowed());
    let d = decide(&e, &TestRequest::get("/x").peer("jobs", "batch"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::DeniedByRule));
}

// --- Audit --------------------------------------------------------------------------

#[test]
fn an_audit_port_lets_what_it_would_refuse_through_as_a_would_deny() {
    let e = engine(
        PortPolicy::test(8080)
            .audit()
            .rule(RuleConfig::allow("admin-area").to(&[], &["/admin/**"]))
            .rule(RuleConfig::deny("no-admin").to(&[], &["/admin/**"])),
    );
    let d = decide(&e, &TestRequest::get("/admin/users"));
    assert_eq!(d.verdict, Verdict::WouldDeny(Reason::DeniedByRule));
    assert!(d.allowed());
    assert_eq!(d.status(), 200);
    assert_eq!(d.label(), "would_deny");
    let d = decide(&e, &TestRequest::get("/other"));
    assert_eq!(d.verdict, Verdict::WouldDeny(Reason::NoMatchingRule));
}

#[test]
fn an_audit_deny_rule_is_a_would_deny_and_an_enforced_one_still_refuses() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .rule(RuleConfig::deny("trial").to(&["POST"], &[]).audit())
            .rule(RuleConfig::deny("no-deletes").to(&["DELETE"], &[])),
    );
    let d = decide(&e, &TestRequest::new("POST", "/x"));
    assert_eq!(d.verdict, Verdict::WouldDeny(Reason::DeniedByRule));
    assert_eq!(rule_name(&d), Some("trial"));
    let d = decide(&e, &TestRequest::new("DELETE", "/x"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::DeniedByRule));
}

#[test]
fn an_audit_allow_rule_whose_binding_fails_is_a_would_deny_with_the_detail() {
    let e = engine(
        PortPolicy::test(8080).rule(
            RuleConfig::allow("own-orders")
                .to(&["GET"], &["/users/{userId}/orders"])
                .bind_path("userId", "sub")
                .audit(),
        ),
    );
    let d = decide(
        &e,
        &TestRequest::get("/users/bob/orders").jwt("p", json!({"sub": "alice"})),
    );
    assert_eq!(d.verdict, Verdict::WouldDeny(Reason::BindingFailed));
    assert!(d.allowed());
    assert!(
        d.detail.as_deref().unwrap().contains("\"bob\""),
        "{:?}",
        d.detail
    );
}

#[test]
fn an_audit_rules_failed_binding_is_reported_and_the_next_rule_allows() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(
                RuleConfig::allow("trial")
                    .bind_header("x-tenant", "tenant")
                    .audit(),
            )
            .rule(RuleConfig::allow("everyone")),
    );
    let d = decide(&e, &TestRequest::get("/x").jwt("p", json!({"tenant": "a"})));
    // The audited binding fails; the enforced rule after it lets the request through.
    assert_eq!(d.verdict, Verdict::WouldDeny(Reason::BindingFailed));
    assert_eq!(rule_name(&d), Some("everyone"));
    // The binding holds: allowed, and reported by the rule that allows without Audit.
    let d = decide(
        &e,
        &TestRequest::get("/x")
            .jwt("p", json!({"tenant": "a"}))
            .header("x-tenant", "a"),
    );
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(rule_name(&d), Some("everyone"));
}

// --- bindings -----------------------------------------------------------------------

fn bound() -> super::Engine {
    engine(
        PortPolicy::test(8080)
            .rule(
                RuleConfig::allow("own-user")
                    .to(&["GET"], &["/users/{userId}"])
                    .bind_path("userId", "sub"),
            )
            .rule(
                RuleConfig::allow("own-account")
                    .to(&["GET"], &["/accounts"])
                    .bind_query("owner", "sub"),
            )
            .rule(
                RuleConfig::allow("own-tenant")
                    .to(&["GET"], &["/tenant"])
                    .bind_header("x-tenant", "tenant"),
            ),
    )
}

#[test]
fn a_path_parameter_bound_to_a_claim_allows_only_the_claims_value() {
    let e = bound();
    let alice = json!({"sub": "alice"});
    let d = decide(
        &e,
        &TestRequest::get("/users/alice").jwt("p", alice.clone()),
    );
    assert_eq!(d.verdict, Verdict::Allow);
    let d = decide(&e, &TestRequest::get("/users/bob").jwt("p", alice));
    assert_eq!(d.verdict, Verdict::Deny(Reason::BindingFailed));
    assert_eq!(d.status(), 403);
    assert_eq!(rule_name(&d), Some("own-user"));
    let detail = d.detail.unwrap();
    assert!(
        detail.contains("{userId}") && detail.contains("\"bob\"") && detail.contains("\"alice\""),
        "{detail}"
    );
}

#[test]
fn a_binding_without_its_claim_refuses() {
    let e = bound();
    let d = decide(
        &e,
        &TestRequest::get("/users/alice").jwt("p", json!({"name": "alice"})),
    );
    assert_eq!(d.verdict, Verdict::Deny(Reason::BindingFailed));
    assert!(d.detail.unwrap().contains("claim sub is missing"));
    // No token at all: the same refusal, never an allow.
    let d = decide(&e, &TestRequest::get("/users/alice"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::BindingFailed));
}

#[test]
fn a_bound_query_parameter_must_appear_once_and_equal_the_claim() {
    let e = bound();
    let alice = || json!({"sub": "alice"});
    assert!(
        decide(
            &e,
            &TestRequest::get("/accounts?owner=alice").jwt("p", alice())
        )
        .allowed()
    );
    // Percent-encoded the same value.
    assert!(
        decide(
            &e,
            &TestRequest::get("/accounts?owner=%61lice").jwt("p", alice())
        )
        .allowed()
    );
    for target in [
        "/accounts?owner=bob",
        "/accounts?owner=alice&owner=bob",
        "/accounts",
    ] {
        let d = decide(&e, &TestRequest::get(target).jwt("p", alice()));
        assert_eq!(d.verdict, Verdict::Deny(Reason::BindingFailed), "{target}");
    }
}

#[test]
fn a_bound_header_must_appear_once_and_equal_the_claim() {
    let e = bound();
    let t = || TestRequest::get("/tenant").jwt("p", json!({"tenant": 42}));
    // Numbers compare by their text.
    assert!(decide(&e, &t().header("x-tenant", "42")).allowed());
    let d = decide(&e, &t().header("x-tenant", "43"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::BindingFailed));
    let d = decide(&e, &t().header("x-tenant", "42").header("x-tenant", "42"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::BindingFailed));
}

// --- callers ------------------------------------------------------------------------

#[test]
fn namespaces_match_only_identities_of_the_trust_domain() {
    let e = engine(
        PortPolicy::test(8080).rule(RuleConfig::allow("shop").from(Source::namespace("shop"))),
    );
    assert!(decide(&e, &TestRequest::get("/x").peer("shop", "web")).allowed());
    let mut foreign = TestRequest::get("/x");
    foreign.peer = Some("spiffe://evil.example/ns/shop/sa/web".into());
    assert_eq!(
        decide(&e, &foreign).verdict,
        Verdict::Deny(Reason::NoMatchingRule)
    );
}

#[test]
fn ip_blocks_match_ipv4_and_ipv4_mapped_ipv6_sources() {
    let e = engine(PortPolicy::test(8080).rule(
        RuleConfig::allow("office").from(Source::ip_blocks(&["192.168.0.0/16", "2001:db8::/32"])),
    ));
    assert!(decide(&e, &TestRequest::get("/x").from_ip("192.168.4.2")).allowed());
    assert!(decide(&e, &TestRequest::get("/x").from_ip("::ffff:192.168.4.2")).allowed());
    assert!(decide(&e, &TestRequest::get("/x").from_ip("2001:db8::1")).allowed());
    assert!(!decide(&e, &TestRequest::get("/x").from_ip("10.1.1.1")).allowed());
    assert!(!decide(&e, &TestRequest::get("/x").from_ip("::ffff:10.1.1.1")).allowed());
}

#[test]
fn a_bad_cidr_block_is_refused_with_its_field() {
    let cfg = SidecarConfig::test().port(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("x").from(Source::ip_blocks(&["10.0.0.0/33"]))),
    );
    let err = super::Engine::new(&cfg).unwrap_err();
    assert_eq!(err.field, "ports[8080].rules[0].from[0].ipBlocks[0]");
}

#[test]
fn unauthenticated_sources_match_only_callers_without_any_identity() {
    let e = engine(
        PortPolicy::test(8080).rule(
            RuleConfig::allow("public")
                .to(&["GET"], &["/health"])
                .from(Source::unauthenticated()),
        ),
    );
    assert!(decide(&e, &TestRequest::get("/health")).allowed());
    assert!(!decide(&e, &TestRequest::get("/health").peer("default", "web")).allowed());
}

// --- request line and declared API --------------------------------------------------

#[test]
fn trace_and_method_overrides_are_refused_with_or_without_a_policy() {
    let e = engine(PortPolicy::test(8080).rule(RuleConfig::allow("everyone")));
    let mut other_port = TestRequest::new("TRACE", "/x");
    other_port.port = 9090;
    assert_eq!(
        decide(&e, &other_port).verdict,
        Verdict::Deny(Reason::MethodNotAllowed)
    );
    let d = decide(
        &e,
        &TestRequest::new("POST", "/x").header("x-http-method-override", "DELETE"),
    );
    assert_eq!(d.verdict, Verdict::Deny(Reason::MethodOverride));
    let d = decide(&e, &TestRequest::new("POST", "/x?_method=DELETE"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::MethodOverride));
    let d = decide(
        &e,
        &TestRequest::get("/x").header("x-original-url", "/admin"),
    );
    assert_eq!(d.verdict, Verdict::Deny(Reason::PathOverride));
    let d = decide(&e, &TestRequest::get("/a/%2e%2e/admin"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::InvalidPath));
    assert!(d.detail.is_some());
}

#[test]
fn undeclared_endpoints_are_refused_audited_or_allowed_as_the_port_says() {
    let port = || {
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .declare("GET", "/users/{id}")
    };
    let deny = engine(port().undeclared(UndeclaredAction::Deny));
    let d = decide(&deny, &TestRequest::get("/admin"));
    assert_eq!(d.verdict, Verdict::Deny(Reason::UndeclaredEndpoint));
    assert_eq!(d.status(), 404);
    let d = decide(&deny, &TestRequest::new("HEAD", "/users/1"));
    assert_eq!(
        d.verdict,
        Verdict::Allow,
        "HEAD is served as the declared GET"
    );
    assert!(d.declared);
    let audit = engine(port().undeclared(UndeclaredAction::Audit));
    assert_eq!(
        decide(&audit, &TestRequest::get("/admin")).verdict,
        Verdict::WouldDeny(Reason::UndeclaredEndpoint)
    );
    let allow = engine(port().undeclared(UndeclaredAction::Allow));
    assert_eq!(
        decide(&allow, &TestRequest::get("/admin")).verdict,
        Verdict::Allow
    );
}

#[test]
fn an_exact_declared_path_wins_over_a_template_and_a_sunset_retires_it() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .declare("GET", "/users/{id}")
            .declare_sunset("GET", "/users/me", 1_767_225_600),
    );
    let before = decide(&e, &TestRequest::get("/users/me").at(1_767_225_599_000));
    assert_eq!(before.verdict, Verdict::Allow);
    assert_eq!(before.template, Some("/users/me"));
    assert!(before.deprecated);
    let after = decide(&e, &TestRequest::get("/users/me").at(1_767_225_600_000));
    assert_eq!(after.verdict, Verdict::Deny(Reason::Sunset));
    assert_eq!(after.status(), 410);
    assert_eq!(
        decide(&e, &TestRequest::get("/users/7")).template,
        Some("/users/{id}")
    );
}

// --- quotas -------------------------------------------------------------------------

fn quota_engine(q: QuotaConfig) -> super::Engine {
    engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .quota(q),
    )
}

#[test]
fn a_quota_allows_its_limit_per_key_then_refuses_with_the_quota_named() {
    let e = quota_engine(QuotaConfig::test("per-ip", QuotaKey::SourceIp, 3, 60_000));
    let store = LocalQuotas::new(64);
    let r = TestRequest::get("/x");
    let remaining: Vec<u64> = (0..3)
        .map(|_| r.decide(&e, &store).quota.unwrap().verdict.remaining)
        .collect();
    assert_eq!(remaining, [2, 1, 0]);
    let d = r.decide(&e, &store);
    assert_eq!(d.verdict, Verdict::Deny(Reason::QuotaExceeded));
    assert_eq!(d.status(), 429);
    assert_eq!(rule_name(&d), Some("per-ip"));
    let q = d.quota.unwrap();
    // A Rolling window gives one request back every period / limit.
    assert_eq!(q.verdict.retry_after_ms, 20_000);
    assert_eq!(q.window_seconds, 60);
    // Another key has its own budget; the spent one comes back as time passes.
    assert!(
        TestRequest::get("/x")
            .from_ip("10.0.0.2")
            .decide(&e, &store)
            .allowed()
    );
    assert!(r.clone().at(r.now_ms + 20_000).decide(&e, &store).allowed());
}

#[test]
fn the_tightest_of_several_quotas_is_reported() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .quota(QuotaConfig::test("wide", QuotaKey::SourceIp, 100, 60_000))
            .quota(QuotaConfig::test("narrow", QuotaKey::SourceIp, 5, 60_000)),
    );
    let store = LocalQuotas::new(64);
    let d = TestRequest::get("/x").decide(&e, &store);
    let q = d.quota.unwrap();
    assert_eq!(q.quota.name, "narrow");
    assert_eq!((q.verdict.limit, q.verdict.remaining), (5, 4));
}

#[test]
fn a_quota_counts_only_the_operations_it_matches_and_only_requests_with_its_key() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("everyone"))
            .quota(
                QuotaConfig::test("writes", QuotaKey::Claim("sub".into()), 1, 60_000)
                    .matching(&["POST"], &[]),
            ),
    );
    let store = LocalQuotas::new(64);
    let alice = || TestRequest::new("POST", "/x").jwt("p", json!({"sub": "alice"}));
    assert!(alice().decide(&e, &store).allowed());
    assert_eq!(
        alice().decide(&e, &store).verdict,
        Verdict::Deny(Reason::QuotaExceeded)
    );
    // Reads are not counted; a request without the claim is not counted either.
    assert!(
        TestRequest::get("/x")
            .jwt("p", json!({"sub": "alice"}))
            .decide(&e, &store)
            .quota
            .is_none()
    );
    assert!(
        TestRequest::new("POST", "/x")
            .decide(&e, &store)
            .quota
            .is_none()
    );
}

#[test]
fn an_audit_quota_spent_is_a_would_deny() {
    let e = quota_engine(QuotaConfig::test("trial", QuotaKey::SourceIp, 1, 60_000).audit());
    let store = LocalQuotas::new(64);
    assert_eq!(
        TestRequest::get("/x").decide(&e, &store).verdict,
        Verdict::Allow
    );
    let d = TestRequest::get("/x").decide(&e, &store);
    assert_eq!(d.verdict, Verdict::WouldDeny(Reason::QuotaExceeded));
    assert!(d.allowed());
}

#[test]
fn a_calendar_quota_resets_on_the_utc_boundary() {
    let e = quota_engine(
        QuotaConfig::test("daily", QuotaKey::SourceIp, 1, 86_400_000)
            .window(Window::Calendar(crate::config::CalendarUnit::Day)),
    );
    let store = LocalQuotas::new(64);
    let noon = 1_767_268_800_000; // 2026-01-01T12:00:00Z
    assert!(TestRequest::get("/x").at(noon).decide(&e, &store).allowed());
    let d = TestRequest::get("/x").at(noon + 1000).decide(&e, &store);
    assert_eq!(d.verdict, Verdict::Deny(Reason::QuotaExceeded));
    // Reset at midnight: 12 h less the second that passed.
    assert_eq!(d.quota.unwrap().verdict.retry_after_ms, 43_199_000);
    assert!(
        TestRequest::get("/x")
            .at(noon + 43_200_000)
            .decide(&e, &store)
            .allowed()
    );
}

#[test]
fn a_monthly_quota_is_per_the_months_own_length() {
    let e = quota_engine(
        QuotaConfig::test("monthly", QuotaKey::SourceIp, 10, 30 * 86_400_000)
            .window(Window::Calendar(crate::config::CalendarUnit::Month)),
    );
    let store = LocalQuotas::new(64);
    let feb = 1_770_000_000_000; // 2026-02-02
    let q = TestRequest::get("/x")
        .at(feb)
        .decide(&e, &store)
        .quota
        .unwrap();
    assert_eq!(q.window_seconds, 28 * 86_400, "February 2026 has 28 days");
    let jan = 1_767_400_000_000; // 2026-01-03
    let q = TestRequest::get("/x")
        .from_ip("10.0.0.9")
        .at(jan)
        .decide(&e, &store)
        .quota
        .unwrap();
    assert_eq!(q.window_seconds, 31 * 86_400);
}

#[test]
fn quotas_are_not_counted_for_requests_the_rules_refuse() {
    let e = engine(
        PortPolicy::test(8080)
            .rule(RuleConfig::allow("reads").to(&["GET"], &[]))
            .quota(QuotaConfig::test("all", QuotaKey::SourceIp, 1, 60_000)),
    );
    let store = LocalQuotas::new(64);
    assert!(!TestRequest::new("POST", "/x").decide(&e, &store).allowed());
    // The refused POST spent nothing.
    assert!(TestRequest::get("/x").decide(&e, &store).allowed());
}
