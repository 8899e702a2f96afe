//! The endpoints this sidecar served, since the last report: a bounded table of
//! (port, method, path template) → counts, sent as inventory deltas with each `Report`.
//!
//! Recording happens after the decision and the response, under one short lock. The table
//! holds at most [`MAX_ENDPOINTS`] endpoints; requests to further endpoints are counted as
//! overflow, so a scanner spraying random URLs cannot grow memory. Templates come from
//! `apiward_policy::inventory`.

use std::collections::HashMap;
use std::sync::Mutex;

use apiward_policy::inventory::Templater;
use apiward_policy::report::{AuthKind, InventoryEntry};

/// Endpoints held between two reports.
pub const MAX_ENDPOINTS: usize = 2048;
/// Of those, kept for declared endpoints: undeclared ones (what a scanner sprays) may fill
/// only the rest, so a scan never pushes the real API out of the inventory.
pub const RESERVED_FOR_DECLARED: usize = 512;

/// One request, as the inventory sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// Inbound (app) port.
    pub port: u16,
    /// Method.
    pub method: &'a str,
    /// The request path (no query).
    pub path: &'a str,
    /// The declared endpoint's template, when the request matched one.
    pub declared: Option<&'a str>,
    /// Response status (0 when no HTTP answer).
    pub status: u16,
    /// How the caller was authenticated.
    pub auth: AuthKind,
    /// Who, when known.
    pub principal: Option<&'a str>,
    /// Refused by the policy.
    pub denied: bool,
    /// Let through by Audit mode.
    pub would_deny: bool,
    /// Time to the response head, µs.
    pub latency_micros: u64,
    /// Now, Unix seconds.
    pub now: i64,
}

#[derive(Debug, Default)]
struct Inner {
    templater: Templater,
    table: HashMap<(u16, String, String), InventoryEntry>,
    /// Rows of the table for undeclared endpoints.
    undeclared: usize,
    overflow: u64,
}

/// The table.
#[derive(Debug, Default)]
pub struct Inventory {
    inner: Mutex<Inner>,
}

impl Inventory {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request.
    pub fn record(&self, s: &Seen<'_>) {
        let mut inner = self.inner();
        let path = match s.declared {
            Some(t) => t.to_owned(),
            None => inner.templater.template(s.method, s.path),
        };
        let key = (s.port, s.method.to_owned(), path);
        let full = inner.table.len() >= MAX_ENDPOINTS
            || (s.declared.is_none() && inner.undeclared >= MAX_ENDPOINTS - RESERVED_FOR_DECLARED);
        let e = match inner.table.get_mut(&key) {
            Some(e) => e,
            None if full => {
                inner.overflow += 1;
                return;
            }
            None => {
                inner.undeclared += usize::from(s.declared.is_none());
                inner.table.entry(key.clone()).or_insert(InventoryEntry {
                    port: s.port,
                    method: key.1.clone(),
                    path: key.2.clone(),
                    declared: s.declared.is_some(),
                    requests: 0,
                    responses: [0; 5],
                    unauthenticated: 0,
                    denied: 0,
                    would_deny: 0,
                    first_seen: s.now,
                    last_seen: s.now,
                    top_principals: Vec::new(),
                    latency_sum_micros: 0,
                })
            }
        };
        e.requests += 1;
        if (100..600).contains(&s.status) {
            e.responses[(s.status / 100 - 1) as usize] += 1;
        }
        // Served to a caller with no identity: a refused request was not served.
        e.unauthenticated += u64::from(s.auth == AuthKind::None && !s.denied);
        e.denied += u64::from(s.denied);
        e.would_deny += u64::from(s.would_deny);
        e.last_seen = s.now;
        e.latency_sum_micros += s.latency_micros;
        if let Some(p) = s.principal {
            e.count_principal(p, 1);
        }
    }

    /// Takes what was counted since the last call (for a report), with the overflow.
    pub fn take(&self) -> (Vec<InventoryEntry>, u64) {
        let mut inner = self.inner();
        let entries = inner.table.drain().map(|(_, e)| e).collect();
        inner.undeclared = 0;
        (entries, std::mem::take(&mut inner.overflow))
    }

    /// Puts back what a report that could not be sent carried.
    pub fn restore(&self, entries: Vec<InventoryEntry>, overflow: u64) {
        let mut inner = self.inner();
        inner.overflow += overflow;
        for e in entries {
            let key = (e.port, e.method.clone(), e.path.clone());
            let room = inner.table.len() < MAX_ENDPOINTS
                && (e.declared || inner.undeclared < MAX_ENDPOINTS - RESERVED_FOR_DECLARED);
            match inner.table.get_mut(&key) {
                Some(have) => have.merge(&e),
                None if room => {
                    inner.undeclared += usize::from(!e.declared);
                    inner.table.insert(key, e);
                }
                None => inner.overflow += e.requests,
            }
        }
    }

    /// Endpoints held now.
    pub fn len(&self) -> usize {
        self.inner().table.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(path: &'a str, declared: Option<&'a str>, principal: Option<&'a str>) -> Seen<'a> {
        Seen {
            port: 8080,
            method: "GET",
            path,
            declared,
            status: 200,
            auth: if principal.is_some() {
                AuthKind::Jwt
            } else {
                AuthKind::None
            },
            principal,
            denied: false,
            would_deny: false,
            latency_micros: 100,
            now: 1_000,
        }
    }

    #[test]
    fn requests_collapse_into_templates_and_are_taken_as_deltas() {
        let inv = Inventory::default();
        for i in 0..50 {
            let p = format!("/users/{i}");
            inv.record(&seen(&p, None, Some("jwt:42")));
        }
        inv.record(&seen("/v1/orders/7", Some("/v1/orders/{orderId}"), None));
        let (mut entries, overflow) = inv.take();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(overflow, 0);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].path.as_str(), entries[0].requests),
            ("/users/{id}", 50)
        );
        assert!(!entries[0].declared);
        assert_eq!(entries[0].top_principals[0].requests, 50);
        assert_eq!(entries[1].path, "/v1/orders/{orderId}");
        assert!(entries[1].declared);
        assert_eq!(entries[1].unauthenticated, 1);
        assert!(
            inv.take().0.is_empty(),
            "taken: the next report starts from zero"
        );
    }

    /// Undeclared rows fill only their share of the table: declared endpoints seen
    /// afterwards still get their rows.
    #[test]
    fn undeclared_rows_never_push_declared_endpoints_out() {
        let inv = Inventory::default();
        // Undeclared rows that do not collapse (put back from an unsent report; a live scan
        // collapses into templates long before).
        let rows = (0..MAX_ENDPOINTS)
            .map(|i| InventoryEntry {
                port: 8080,
                method: "GET".into(),
                path: format!("/scan{i}"),
                declared: false,
                requests: 1,
                responses: [0, 0, 0, 1, 0],
                unauthenticated: 1,
                denied: 0,
                would_deny: 0,
                first_seen: 1,
                last_seen: 1,
                top_principals: Vec::new(),
                latency_sum_micros: 1,
            })
            .collect();
        inv.restore(rows, 0);
        assert_eq!(inv.len(), MAX_ENDPOINTS - RESERVED_FOR_DECLARED);
        inv.record(&seen("/scan-more", None, None));
        for i in 0..RESERVED_FOR_DECLARED {
            let p = format!("/api/v{i}/orders/{{id}}");
            inv.record(&seen("/x", Some(&p), None));
        }
        let (entries, overflow) = inv.take();
        assert_eq!(
            entries.iter().filter(|e| e.declared).count(),
            RESERVED_FOR_DECLARED
        );
        assert_eq!(overflow, RESERVED_FOR_DECLARED as u64 + 1);
    }

    #[test]
    fn random_paths_collapse_and_the_table_stops_at_its_cap() {
        let inv = Inventory::default();
        // A scanner's random paths collapse into a few templates as positions are learned.
        for i in 0..100_000u64 {
            let p = format!("/s{}/{}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 977, i);
            inv.record(&seen(&p, None, None));
        }
        assert!(inv.len() < 50, "{} templates", inv.len());
        inv.take();
        // Endpoints that do not collapse (here: distinct declared templates) stop at the
        // cap; what does not fit is counted as overflow, never dropped silently.
        for i in 0..(MAX_ENDPOINTS as u64 + 500) {
            let p = format!("/declared-{i}");
            inv.record(&seen(&p, Some(&p), None));
        }
        assert_eq!(inv.len(), MAX_ENDPOINTS);
        let (entries, overflow) = inv.take();
        assert_eq!(overflow, 500);
        assert_eq!(
            entries.iter().map(|e| e.requests).sum::<u64>(),
            MAX_ENDPOINTS as u64
        );
    }
}
