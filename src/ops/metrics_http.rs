//! The `[metrics] listen` endpoint: Prometheus text at `/metrics`, and
//! `/healthz` and `/readyz` for load balancers and orchestrators.

use std::io;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::ops::http::{Request, Response};

/// Every metric family the server exports: name, Prometheus type, help.
/// A test checks that every `turnstile_…` name in the source is here.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "turnstile_allocation_setup_seconds",
        "summary",
        "Time to bind an allocation's relay sockets and answer its Allocate.",
    ),
    (
        "turnstile_allocations_active",
        "gauge",
        "Allocations now, by worker, client transport (udp, stream) and relay family.",
    ),
    ("turnstile_allocations_created_total", "counter", "Allocations created."),
    (
        "turnstile_allocations_deleted_total",
        "counter",
        "Allocations ended by the client (Refresh 0, connection closed), the operator or a revocation.",
    ),
    (
        "turnstile_allocations_moved_total",
        "counter",
        "RFC 8016: allocations their client took to a new address with its mobility ticket.",
    ),
    (
        "turnstile_allocations_expired_total",
        "counter",
        "Allocations that expired without a refresh.",
    ),
    (
        "turnstile_auth_failures_total",
        "counter",
        "Authentication failures by reason.",
    ),
    (
        "turnstile_bandwidth_dropped_bytes_total",
        "counter",
        "Relayed bytes dropped by max_bps or bps_capacity.",
    ),
    (
        "turnstile_bandwidth_dropped_packets_total",
        "counter",
        "Relayed packets dropped by max_bps or bps_capacity.",
    ),
    (
        "turnstile_channels_active",
        "gauge",
        "Live channel bindings, by worker.",
    ),
    ("turnstile_connections", "gauge", "Open TCP and TLS client connections."),
    (
        "turnstile_connections_closed_total",
        "counter",
        "TCP and TLS client connections closed by the server, by reason.",
    ),
    (
        "turnstile_connections_refused_total",
        "counter",
        "TCP and TLS client connections refused, by reason.",
    ),
    (
        "turnstile_dropped_packets_total",
        "counter",
        "Packets dropped without an answer, by reason.",
    ),
    (
        "turnstile_error_responses_total",
        "counter",
        "Error responses sent, by code.",
    ),
    (
        "turnstile_http_connections_refused_total",
        "counter",
        "Metrics and admin HTTP connections refused, by reason.",
    ),
    (
        "turnstile_icmp_relayed_total",
        "counter",
        "ICMP errors relayed to clients as Data indications.",
    ),
    (
        "turnstile_peer_refused_total",
        "counter",
        "Peer addresses refused by the peer policy, by reason.",
    ),
    ("turnstile_permissions_active", "gauge", "Live permissions, by worker."),
    (
        "turnstile_realm_allocations",
        "gauge",
        "Allocations held, by realm (the configured realms only).",
    ),
    (
        "turnstile_realm_allocations_granted_total",
        "counter",
        "Allocations granted, by realm.",
    ),
    (
        "turnstile_realm_quota_refusals_total",
        "counter",
        "Allocations refused for a quota, by realm.",
    ),
    (
        "turnstile_quota_refusals_total",
        "counter",
        "Allocations refused for quota: user, ip, total, or realm (a realm's own total_quota).",
    ),
    ("turnstile_relay_sockets", "gauge", "Relay sockets open, by worker."),
    (
        "turnstile_relayed_bytes_by_transport_total",
        "counter",
        "Relayed bytes by direction and client transport.",
    ),
    (
        "turnstile_relayed_bytes_total",
        "counter",
        "Relayed bytes by direction.",
    ),
    (
        "turnstile_relayed_packets_by_transport_total",
        "counter",
        "Relayed packets by direction and client transport.",
    ),
    (
        "turnstile_relayed_packets_total",
        "counter",
        "Relayed packets by direction.",
    ),
    (
        "turnstile_requests_total",
        "counter",
        "STUN/TURN requests received, by method.",
    ),
    (
        "turnstile_responses_total",
        "counter",
        "Responses sent, by method and code.",
    ),
    (
        "turnstile_send_dropped_total",
        "counter",
        "Datagrams or frames the kernel or a full client queue refused.",
    ),
    (
        "turnstile_tcp_relay_connections",
        "gauge",
        "RFC 6062 peer connections, by worker.",
    ),
    (
        "turnstile_store_statuses_dropped_total",
        "counter",
        "Allocation statuses not published to the fleet store: its queue was full (the store away).",
    ),
    (
        "turnstile_upgrades_total",
        "counter",
        "Live upgrades: failed (counted by the process that served on) and taken_over (by the new process).",
    ),
    (
        "turnstile_store_up",
        "gauge",
        "1 while the fleet store (Redis) answers, 0 while it does not (the users and secrets read last stay in force).",
    ),
    (
        "turnstile_udp_gso_sends_total",
        "counter",
        "UDP GSO sends (several datagrams in one system call).",
    ),
    (
        "turnstile_unauthenticated_bytes_total",
        "counter",
        "Bytes of unauthenticated requests over UDP and of the answers sent, by direction.",
    ),
    (
        "turnstile_unauthenticated_responses_suppressed_total",
        "counter",
        "Unauthenticated answers not sent: the source's budget was spent.",
    ),
    (
        "turnstile_xdp_bindings",
        "gauge",
        "Channel bindings relayed by the XDP fast path now.",
    ),
    (
        "turnstile_xdp_passed_total",
        "counter",
        "Packets for the server the XDP program left to userspace, by reason.",
    ),
    (
        "turnstile_xdp_relayed_bytes_total",
        "counter",
        "Payload bytes the XDP fast path relayed, by direction (also in turnstile_relayed_bytes_total).",
    ),
    (
        "turnstile_xdp_relayed_packets_total",
        "counter",
        "Packets the XDP fast path relayed, by direction (also in turnstile_relayed_packets_total).",
    ),
];

/// Installs the global metrics recorder, with every family described.
pub fn install_recorder() -> io::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder().map_err(io::Error::other)?;
    for (name, kind, help) in FAMILIES {
        match *kind {
            "counter" => metrics::describe_counter!(*name, *help),
            "gauge" => metrics::describe_gauge!(*name, *help),
            _ => metrics::describe_histogram!(*name, *help),
        }
    }
    Ok(handle)
}

/// One family's `# HELP` line, `# TYPE` line and samples.
type Family = (Option<String>, Option<String>, Vec<String>);

/// The exporter's text with every family under its `# HELP` and `# TYPE`
/// lines, families sorted by name, so two scrapes list them alike.
pub fn render_sorted(text: &str) -> String {
    let mut families: std::collections::BTreeMap<String, Family> = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            current = rest.split(' ').next().unwrap_or_default().to_owned();
            let entry = families.entry(current.clone()).or_default();
            if line.starts_with("# HELP ") {
                entry.0 = Some(line.to_owned());
            } else {
                entry.1 = Some(line.to_owned());
            }
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        // Summary and histogram samples carry suffixes of their family.
        let family = if name.starts_with(current.as_str()) && !current.is_empty() {
            current.clone()
        } else {
            name.to_owned()
        };
        families.entry(family).or_default().2.push(line.to_owned());
    }
    let mut out = String::with_capacity(text.len() + 1024);
    for (name, (help, kind, samples)) in families {
        if samples.is_empty() {
            continue;
        }
        let known = FAMILIES.iter().find(|(n, _, _)| *n == name);
        match (help, known) {
            (Some(h), _) => out.push_str(&h),
            (None, Some((_, _, h))) => out.push_str(&format!("# HELP {name} {h}")),
            (None, None) => out.push_str(&format!("# HELP {name} {name}")),
        }
        out.push('\n');
        match (kind, known) {
            (Some(t), _) => out.push_str(&t),
            (None, Some((_, k, _))) => out.push_str(&format!("# TYPE {name} {k}")),
            (None, None) => out.push_str(&format!("# TYPE {name} untyped")),
        }
        out.push('\n');
        for s in samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

/// Answers a scrape, or a health check: `/healthz` (the process answers)
/// and `/readyz` (listeners up and not draining).
/// Sets the per-realm series from the shared allocation counts, just
/// before a scrape renders them (the counts are exact there, and realm
/// names come from the configuration, never from the network).
pub fn export_realms(quotas: &crate::proto::server::Quotas) {
    for (realm, c) in quotas.realms() {
        metrics::gauge!("turnstile_realm_allocations", "realm" => realm.clone()).set(f64::from(c.allocations));
        metrics::counter!("turnstile_realm_allocations_granted_total", "realm" => realm.clone()).absolute(c.granted);
        metrics::counter!("turnstile_realm_quota_refusals_total", "realm" => realm).absolute(c.refused);
    }
}

pub fn handle(handle: &PrometheusHandle, req: &Request, ready: bool) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") if ready => Response::text(200, "ready\n"),
        ("GET", "/readyz") => Response::text(503, "not ready: draining or full\n"),
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: render_sorted(&handle.render()),
        },
        _ => Response::text(404, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_in_the_source_is_described() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut names = std::collections::BTreeSet::new();
        let mut dirs = vec![std::path::PathBuf::from(root)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    if !p.ends_with("bin") {
                        dirs.push(p);
                    }
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for part in text.split("\"turnstile_").skip(1) {
                        let name: String = part
                            .chars()
                            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                            .collect();
                        if part[name.len()..].starts_with('"') && !name.is_empty() {
                            names.insert(format!("turnstile_{name}"));
                        }
                    }
                }
            }
        }
        names.remove("turnstile_log");
        // The XDP program's name (src/io/xdp), not a metric.
        names.remove("turnstile_relay");
        for n in &names {
            assert!(FAMILIES.iter().any(|(f, _, _)| f == n), "{n} has no entry in FAMILIES");
        }
        assert!(names.len() >= 25, "{names:?}");
    }

    #[test]
    fn families_come_sorted_each_under_help_and_type() {
        let text = "# TYPE b_total counter\nb_total 1\n\n# TYPE turnstile_relay_sockets gauge\nturnstile_relay_sockets{worker=\"0\"} 3\n\na_total 2\n";
        let out = render_sorted(text);
        assert_eq!(
            out,
            "# HELP a_total a_total\n# TYPE a_total untyped\na_total 2\n\
             # HELP b_total b_total\n# TYPE b_total counter\nb_total 1\n\
             # HELP turnstile_relay_sockets Relay sockets open, by worker.\n# TYPE turnstile_relay_sockets gauge\nturnstile_relay_sockets{worker=\"0\"} 3\n"
        );
    }
}
