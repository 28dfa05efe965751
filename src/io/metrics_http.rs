//! The `[metrics] listen` endpoint: Prometheus text at `/metrics`, and
//! `/healthz` and `/readyz` for load balancers and orchestrators.

use std::io;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::io::http::{Request, Response};

/// Installs the global metrics recorder.
pub fn install_recorder() -> io::Result<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().map_err(io::Error::other)
}

/// Answers a scrape, or a health check: `/healthz` (the process answers)
/// and `/readyz` (listeners up and not draining).
pub fn handle(handle: &PrometheusHandle, req: &Request, ready: bool) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") if ready => Response::text(200, "ready\n"),
        ("GET", "/readyz") => Response::text(503, "not ready: draining or full\n"),
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: handle.render(),
        },
        _ => Response::text(404, "not found\n"),
    }
}
