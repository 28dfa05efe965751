//! Turns a worker's plain counters into Prometheus metrics: deltas are
//! added once a second, so the packet path never touches a shared atomic.

use crate::proto::server::{Gauges, REQUEST_METHODS, RESPONSE_CODES, Stats};

pub struct StatsExporter {
    worker: String,
    last: Stats,
}

impl StatsExporter {
    pub fn new(worker: usize) -> StatsExporter {
        StatsExporter {
            worker: worker.to_string(),
            last: Stats::default(),
        }
    }

    pub fn export(&mut self, now: &Stats, gauges: &Gauges, relay_sockets: usize) {
        let last = &self.last;
        let add = |name: &'static str, labels: &[(&'static str, &'static str)], cur: u64, prev: u64| {
            if cur > prev {
                let labels: Vec<(&'static str, String)> = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
                metrics::counter!(name, &labels).increment(cur - prev);
            }
        };
        add(
            "turnstile_relayed_packets_total",
            &[("direction", "client_to_peer")],
            now.client_to_peer_packets,
            last.client_to_peer_packets,
        );
        add(
            "turnstile_relayed_packets_total",
            &[("direction", "peer_to_client")],
            now.peer_to_client_packets,
            last.peer_to_client_packets,
        );
        add(
            "turnstile_relayed_bytes_total",
            &[("direction", "client_to_peer")],
            now.client_to_peer_bytes,
            last.client_to_peer_bytes,
        );
        add(
            "turnstile_relayed_bytes_total",
            &[("direction", "peer_to_client")],
            now.peer_to_client_bytes,
            last.peer_to_client_bytes,
        );
        // By the client's transport: stream (TCP/TLS) is counted, UDP is the rest.
        let by_transport = [
            (
                "client_to_peer",
                "packets",
                now.client_to_peer_packets,
                now.stream_client_to_peer_packets,
                last.client_to_peer_packets,
                last.stream_client_to_peer_packets,
            ),
            (
                "peer_to_client",
                "packets",
                now.peer_to_client_packets,
                now.stream_peer_to_client_packets,
                last.peer_to_client_packets,
                last.stream_peer_to_client_packets,
            ),
            (
                "client_to_peer",
                "bytes",
                now.client_to_peer_bytes,
                now.stream_client_to_peer_bytes,
                last.client_to_peer_bytes,
                last.stream_client_to_peer_bytes,
            ),
            (
                "peer_to_client",
                "bytes",
                now.peer_to_client_bytes,
                now.stream_peer_to_client_bytes,
                last.peer_to_client_bytes,
                last.stream_peer_to_client_bytes,
            ),
        ];
        for (direction, unit, total, stream, last_total, last_stream) in by_transport {
            let name = if unit == "packets" {
                "turnstile_relayed_packets_by_transport_total"
            } else {
                "turnstile_relayed_bytes_by_transport_total"
            };
            add(
                name,
                &[("direction", direction), ("transport", "stream")],
                stream,
                last_stream,
            );
            add(
                name,
                &[("direction", direction), ("transport", "udp")],
                total - stream,
                last_total - last_stream,
            );
        }
        add(
            "turnstile_unauthenticated_responses_suppressed_total",
            &[],
            now.responses_suppressed,
            last.responses_suppressed,
        );
        add(
            "turnstile_unauthenticated_bytes_total",
            &[("direction", "in")],
            now.unauthenticated_bytes_in,
            last.unauthenticated_bytes_in,
        );
        add(
            "turnstile_unauthenticated_bytes_total",
            &[("direction", "out")],
            now.unauthenticated_bytes_out,
            last.unauthenticated_bytes_out,
        );
        add(
            "turnstile_bandwidth_dropped_packets_total",
            &[],
            now.bandwidth_dropped_packets,
            last.bandwidth_dropped_packets,
        );
        add(
            "turnstile_bandwidth_dropped_bytes_total",
            &[],
            now.bandwidth_dropped_bytes,
            last.bandwidth_dropped_bytes,
        );
        add(
            "turnstile_allocations_created_total",
            &[],
            now.allocations_created,
            last.allocations_created,
        );
        add(
            "turnstile_allocations_expired_total",
            &[],
            now.allocations_expired,
            last.allocations_expired,
        );
        add(
            "turnstile_allocations_deleted_total",
            &[],
            now.allocations_deleted,
            last.allocations_deleted,
        );
        add(
            "turnstile_allocations_moved_total",
            &[],
            now.allocations_moved,
            last.allocations_moved,
        );
        add("turnstile_icmp_relayed_total", &[], now.icmp_relayed, last.icmp_relayed);
        for (i, quota) in ["user", "ip", "total", "realm"].iter().enumerate() {
            add(
                "turnstile_quota_refusals_total",
                &[("quota", quota)],
                now.quota_refusals.get(i).copied().unwrap_or(0),
                last.quota_refusals.get(i).copied().unwrap_or(0),
            );
        }
        add(
            "turnstile_peer_refused_total",
            &[("reason", "special_purpose")],
            now.peer_special_purpose,
            last.peer_special_purpose,
        );
        add(
            "turnstile_peer_refused_total",
            &[("reason", "operator_denied")],
            now.peer_operator_denied,
            last.peer_operator_denied,
        );
        add(
            "turnstile_peer_refused_total",
            &[("reason", "server_own_port")],
            now.peer_server_own_port,
            last.peer_server_own_port,
        );
        add(
            "turnstile_auth_failures_total",
            &[("reason", "bad_integrity")],
            now.auth_bad_integrity,
            last.auth_bad_integrity,
        );
        add(
            "turnstile_auth_failures_total",
            &[("reason", "unknown_user")],
            now.auth_unknown_user,
            last.auth_unknown_user,
        );
        add(
            "turnstile_auth_failures_total",
            &[("reason", "revoked")],
            now.auth_revoked,
            last.auth_revoked,
        );
        add(
            "turnstile_auth_failures_total",
            &[("reason", "expired")],
            now.auth_expired,
            last.auth_expired,
        );
        add(
            "turnstile_auth_failures_total",
            &[("reason", "stale_nonce")],
            now.auth_stale_nonce,
            last.auth_stale_nonce,
        );
        add(
            "turnstile_auth_failures_total",
            &[("reason", "bid_down")],
            now.auth_bid_down,
            last.auth_bid_down,
        );
        for ((code, cur), (_, prev)) in now.errors.iter().zip(last.errors.iter()) {
            add("turnstile_error_responses_total", &[("code", code)], cur, prev);
        }
        for (method, (cur, prev)) in REQUEST_METHODS
            .iter()
            .zip(now.requests.iter().zip(last.requests.iter()))
        {
            add("turnstile_requests_total", &[("method", method)], *cur, *prev);
        }
        for (method, (cur_row, prev_row)) in REQUEST_METHODS
            .iter()
            .zip(now.responses.iter().zip(last.responses.iter()))
        {
            for (code, (cur, prev)) in RESPONSE_CODES.iter().zip(cur_row.iter().zip(prev_row.iter())) {
                add(
                    "turnstile_responses_total",
                    &[("method", method), ("code", code)],
                    *cur,
                    *prev,
                );
            }
        }
        for (t, transport) in ["udp", "stream"].iter().enumerate() {
            for (f, family) in ["ipv4", "ipv6"].iter().enumerate() {
                let n = gauges.allocations.get(t).and_then(|r| r.get(f)).copied().unwrap_or(0);
                metrics::gauge!(
                    "turnstile_allocations_active",
                    "worker" => self.worker.clone(),
                    "transport" => *transport,
                    "family" => *family
                )
                .set(n as f64);
            }
        }
        metrics::gauge!("turnstile_permissions_active", "worker" => self.worker.clone()).set(gauges.permissions as f64);
        metrics::gauge!("turnstile_channels_active", "worker" => self.worker.clone()).set(gauges.channels as f64);
        metrics::gauge!("turnstile_tcp_relay_connections", "worker" => self.worker.clone())
            .set(gauges.tcp_connections as f64);
        metrics::gauge!("turnstile_relay_sockets", "worker" => self.worker.clone()).set(relay_sockets as f64);
        self.last = now.clone();
    }
}
