//! The Prometheus endpoint: `GET /metrics` on the `[metrics] listen` address.

use std::io;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::io::http::{Request, Response};

/// Installs the global metrics recorder.
pub fn install_recorder() -> io::Result<PrometheusHandle> {
    PrometheusBuilder::new().install_recorder().map_err(io::Error::other)
}

/// Answers a scrape.
pub fn handle(handle: &PrometheusHandle, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: handle.render(),
        },
        _ => Response::text(404, "not found\n"),
    }
}
