//! The admin listener (`[admin]`, loopback by default, bearer token): the
//! credential API that hands out short-lived TURN REST credentials as
//! RTCIceServer JSON, in turnstile's own shape and in the shape of a hosted
//! TURN service's API (`POST /v1/turn/keys/{key_id}/credentials/generate-ice-servers`),
//! so an app built for that service can use a self-hosted turnstile by
//! changing its base URL.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::ops::http::{Request, Response};
use crate::proto::auth::rest;

/// Longest credential lifetime handed out (seconds).
pub const MAX_TTL: u64 = 7 * 24 * 3600;
/// Lifetime when the request names none.
pub const DEFAULT_TTL: u64 = 24 * 3600;

/// What the credential API needs to know.
#[derive(Debug, Clone)]
pub struct CredentialApi {
    /// SHA-256 of the bearer token: a presented token is hashed and the two
    /// fixed-size digests compared in constant time, so neither the bytes
    /// nor the length of the token show in the time an answer takes.
    token_digest: [u8; 32],
    /// The default realm first, then the others (`realm` in a request).
    realms: Vec<RealmUrls>,
}

/// One realm's REST secret and the URLs of the listeners serving it.
#[derive(Debug, Clone)]
struct RealmUrls {
    name: String,
    secret: Option<String>,
    stun: Vec<String>,
    turn: Vec<String>,
}

/// The stun: and turn: URLs of these (udp, tcp, tls) listeners.
fn urls(
    listeners: (&[SocketAddr], &[SocketAddr], &[SocketAddr]),
    public_host: Option<&str>,
    fallback: IpAddr,
) -> (Vec<String>, Vec<String>) {
    let (udp, tcp, tls) = listeners;
    let host = |a: &SocketAddr| url_host(a, public_host, fallback);
    let stun = udp.iter().map(|a| format!("stun:{}:{}", host(a), a.port())).collect();
    let turn = udp
        .iter()
        .map(|a| format!("turn:{}:{}?transport=udp", host(a), a.port()))
        .chain(
            tcp.iter()
                .map(|a| format!("turn:{}:{}?transport=tcp", host(a), a.port())),
        )
        .chain(
            tls.iter()
                .map(|a| format!("turns:{}:{}?transport=tcp", host(a), a.port())),
        )
        .collect();
    (stun, turn)
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn peer_of(req: &Request) -> String {
    req.peer.map(|p| p.to_string()).unwrap_or_default()
}

/// A request with a missing or wrong token: worth an operator's attention.
fn log_refused(req: &Request) {
    tracing::warn!(
        admin = %peer_of(req),
        method = %req.method,
        path = %req.path,
        "admin: request refused, missing or wrong bearer token"
    );
}

/// Host part of a URL for a listener.
fn url_host(listen: &SocketAddr, public_host: Option<&str>, fallback: IpAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        fallback
    } else {
        listen.ip()
    };
    match public_host {
        Some(h) => h.to_owned(),
        None if ip.is_ipv6() => format!("[{ip}]"),
        None => ip.to_string(),
    }
}

impl CredentialApi {
    /// `public_host` names the server in URLs; without it the listener's own
    /// address is used (or `fallback` for an unspecified one).
    pub fn new(
        token: String,
        secret: Option<String>,
        listeners: (&[SocketAddr], &[SocketAddr], &[SocketAddr]),
        public_host: Option<&str>,
        fallback: IpAddr,
    ) -> CredentialApi {
        CredentialApi {
            token_digest: digest(&token),
            realms: Vec::new(),
        }
        .with_realm("", secret, listeners, public_host, fallback)
    }

    /// The default realm's name (a request may name it too).
    pub fn default_realm(mut self, name: &str) -> CredentialApi {
        if let Some(r) = self.realms.first_mut() {
            name.clone_into(&mut r.name);
        }
        self
    }

    /// Another realm, asked for with `realm` in a request: credentials
    /// from its first REST secret, URLs of the listeners serving it.
    pub fn with_realm(
        mut self,
        name: &str,
        secret: Option<String>,
        listeners: (&[SocketAddr], &[SocketAddr], &[SocketAddr]),
        public_host: Option<&str>,
        fallback: IpAddr,
    ) -> CredentialApi {
        let (stun, turn) = urls(listeners, public_host, fallback);
        self.realms.push(RealmUrls {
            name: name.to_owned(),
            secret,
            stun,
            turn,
        });
        self
    }

    pub fn authorized(&self, req: &Request) -> bool {
        req.bearer
            .as_ref()
            .is_some_and(|given| crate::proto::stun::integrity::ct_eq(&digest(given), &self.token_digest))
    }

    /// A REST username and password of `realm` valid for `ttl` seconds from now.
    fn credential(realm: &RealmUrls, user: &str, ttl: u64) -> Option<(String, String)> {
        let secret = realm.secret.as_ref()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let username = format!("{}:{}", now + ttl, user);
        let password = rest::password(secret.as_bytes(), &username);
        Some((username, password))
    }

    /// Routes a request on the admin listener.
    pub fn handle(&self, req: &Request) -> Response {
        if !self.authorized(req) {
            log_refused(req);
            return Response::json(401, json!({"error": "missing or wrong bearer token"}).to_string());
        }
        let body: serde_json::Value = if req.body.is_empty() {
            json!({})
        } else {
            match serde_json::from_slice(&req.body) {
                Ok(v @ serde_json::Value::Object(_)) => v,
                Ok(_) => return Response::json(400, json!({"error": "body is not a JSON object"}).to_string()),
                Err(_) => return Response::json(400, json!({"error": "body is not JSON"}).to_string()),
            }
        };
        // A ttl that is named must be a whole number of seconds in range: a
        // string, a fraction or a negative number is an error, never the
        // default (a caller asking for 300 s must not get a day).
        let ttl = match (body.get("ttl"), req.query_param("ttl")) {
            (Some(v), _) => v.as_u64(),
            (None, Some(q)) => q.parse::<u64>().ok().filter(|_| q.bytes().all(|b| b.is_ascii_digit())),
            (None, None) => Some(DEFAULT_TTL),
        };
        let Some(ttl) = ttl.filter(|t| (1..=MAX_TTL).contains(t)) else {
            return Response::json(
                400,
                json!({"error": format!("ttl must be a whole number of seconds, 1..={MAX_TTL}")}).to_string(),
            );
        };
        let user = match body.get("user") {
            Some(serde_json::Value::String(u)) => u.clone(),
            Some(_) => return Response::json(400, json!({"error": "user must be a string"}).to_string()),
            None => req.query_param("user").unwrap_or_else(|| "turnstile".to_owned()),
        };
        if user.len() > 200 || user.chars().any(char::is_control) {
            return Response::json(400, json!({"error": "bad user"}).to_string());
        }
        let path: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let hosted_shape = matches!(
            path.as_slice(),
            ["v1", "turn", "keys", _, "credentials", "generate-ice-servers"]
        );
        match (req.method.as_str(), path.as_slice()) {
            ("GET" | "POST", ["v1", "ice-servers"]) => {}
            ("POST", _) if hosted_shape => {}
            (_, ["v1", "ice-servers"]) => return Response::json(405, json!({"error": "use GET or POST"}).to_string()),
            _ => return Response::json(404, json!({"error": "not found"}).to_string()),
        }
        // `realm` picks one of several realms; none (or the first's name): the default.
        let asked = match body.get("realm") {
            Some(serde_json::Value::String(r)) => Some(r.clone()),
            Some(_) => return Response::json(400, json!({"error": "realm must be a string"}).to_string()),
            None => req.query_param("realm"),
        };
        let realm = match asked {
            None => self.realms.first(),
            Some(name) => match self.realms.iter().find(|r| r.name == name) {
                Some(r) => Some(r),
                None => return Response::json(404, json!({"error": "no such realm"}).to_string()),
            },
        };
        let Some(realm) = realm else {
            return Response::json(404, json!({"error": "no such realm"}).to_string());
        };
        let Some((username, credential)) = Self::credential(realm, &user, ttl) else {
            return Response::json(
                503,
                json!({"error": "no REST secret configured for this realm ([auth] secrets, [[realm]] secrets)"})
                    .to_string(),
            );
        };
        let (stun, turn) = (&realm.stun, &realm.turn);
        tracing::info!(
            admin = %peer_of(req),
            user = %username,
            ttl,
            "admin: REST credential issued"
        );
        if hosted_shape {
            // 201 with STUN and TURN as separate entries, like the hosted API.
            let body = json!({
                "iceServers": [
                    {"urls": stun},
                    {"urls": turn, "username": username, "credential": credential},
                ]
            });
            Response::json(201, body.to_string())
        } else {
            let mut urls = stun.clone();
            urls.extend(turn.iter().cloned());
            let body = json!({
                "iceServers": [{"urls": urls, "username": username, "credential": credential}],
                "ttl": ttl,
            });
            Response::json(200, body.to_string())
        }
    }
}

/// One allocation as the admin API lists it, with the node holding it.
pub fn allocation_json(a: &crate::proto::server::AllocationInfo, node: &str) -> serde_json::Value {
    json!({
        "node": node,
        "user": a.user,
        "realm": a.realm,
        "client": a.client.to_string(),
        "transport": a.transport,
        "relay": a.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "tcp_relay": a.tcp_relay,
        "age_seconds": a.age_secs,
        "expires_in_seconds": a.expires_in_secs,
        "permissions": a.permissions,
        "channels": a.channels,
        "to_peer": {"packets": a.traffic.to_peer_packets, "bytes": a.traffic.to_peer_bytes},
        "to_client": {"packets": a.traffic.to_client_packets, "bytes": a.traffic.to_client_bytes},
    })
}

/// The whole admin listener: allocations (list, delete by user or client),
/// revocations and the credential API, behind the same bearer token.
pub struct AdminApi {
    pub credentials: CredentialApi,
    pub started: std::rc::Rc<crate::io::Started>,
    pub fleet: std::rc::Rc<crate::ops::fleet::Fleet>,
    /// Live upgrades that failed (the old process served on).
    pub upgrade_failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Longest revocation (seconds).
pub const MAX_REVOCATION: u64 = 30 * 24 * 3600;

impl AdminApi {
    pub fn handle(&self, req: &Request) -> Response {
        let path = req.path.trim_end_matches('/');
        if path == "/v1/revocations" {
            return self.revocations(req);
        }
        if path == "/v1/status" {
            if !self.credentials.authorized(req) {
                log_refused(req);
                return Response::json(401, json!({"error": "missing or wrong bearer token"}).to_string());
            }
            return Response::json(
                200,
                json!({
                    "pid": std::process::id(),
                    "version": env!("CARGO_PKG_VERSION"),
                    "allocations": self.started.quotas.total(),
                    "draining": self.started.is_draining(),
                    "upgrade_failures": self.upgrade_failures.load(std::sync::atomic::Ordering::Relaxed),
                })
                .to_string(),
            );
        }
        if path != "/v1/allocations" {
            return self.credentials.handle(req);
        }
        if !self.credentials.authorized(req) {
            log_refused(req);
            return Response::json(401, json!({"error": "missing or wrong bearer token"}).to_string());
        }
        match req.method.as_str() {
            "GET" => {
                let node = &self.fleet.node;
                let mut list: Vec<serde_json::Value> = self
                    .started
                    .allocations()
                    .iter()
                    .map(|a| allocation_json(a, node))
                    .collect();
                // The other nodes of a fleet, as they published themselves (≤ 1 s old).
                for (_, theirs) in self.fleet.others() {
                    list.extend(theirs);
                }
                Response::json(200, json!({ "allocations": list }).to_string())
            }
            "DELETE" => {
                let user = req.query_param("user");
                let realm = req.query_param("realm");
                let client = match req.query_param("client").map(|c| c.parse::<SocketAddr>()) {
                    Some(Ok(c)) => Some(c),
                    Some(Err(_)) => return Response::json(400, json!({"error": "client is ip:port"}).to_string()),
                    None => None,
                };
                if user.is_none() && client.is_none() {
                    return Response::json(400, json!({"error": "name a user or a client"}).to_string());
                }
                // A user's allocations end on every node of a fleet (the
                // others within a second); a client address is this node's.
                let deleted = match (&user, client) {
                    (Some(u), None) => self.fleet.kick_everywhere(u, realm.as_deref()),
                    _ => self.started.kick(user.as_deref(), client, realm.as_deref()),
                };
                tracing::info!(
                    admin = %peer_of(req),
                    user = user.as_deref().unwrap_or(""),
                    realm = realm.as_deref().unwrap_or("*"),
                    client = %client.map(|c| c.to_string()).unwrap_or_default(),
                    deleted,
                    "admin: allocations deleted"
                );
                Response::json(200, json!({ "deleted": deleted }).to_string())
            }
            _ => Response::json(405, json!({"error": "use GET or DELETE"}).to_string()),
        }
    }

    /// `POST /v1/revocations {"user": "…", "ttl": N}`: every node refuses
    /// the user's new allocations and ends its existing ones, for N seconds.
    fn revocations(&self, req: &Request) -> Response {
        if !self.credentials.authorized(req) {
            log_refused(req);
            return Response::json(401, json!({"error": "missing or wrong bearer token"}).to_string());
        }
        if req.method != "POST" {
            return Response::json(405, json!({"error": "use POST"}).to_string());
        }
        let body: serde_json::Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return Response::json(400, json!({"error": "the body is a JSON object"}).to_string()),
        };
        let user = match body.get("user").and_then(|u| u.as_str()) {
            Some(u) if !u.is_empty() => u.to_owned(),
            _ => return Response::json(400, json!({"error": "user is a non-empty string"}).to_string()),
        };
        let ttl = match body.get("ttl") {
            None => 3600,
            Some(t) => match t.as_u64() {
                Some(t) if (1..=MAX_REVOCATION).contains(&t) => t,
                _ => {
                    return Response::json(
                        400,
                        json!({"error": format!("ttl is a whole number of seconds, 1..={MAX_REVOCATION}")}).to_string(),
                    );
                }
            },
        };
        let realm = match body.get("realm") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(r)) => Some(r.clone()),
            Some(_) => return Response::json(400, json!({"error": "realm is a string"}).to_string()),
        };
        self.fleet.revoke(&user, realm.as_deref(), ttl);
        tracing::info!(
            admin = %peer_of(req),
            user,
            realm = realm.as_deref().unwrap_or("*"),
            ttl,
            "admin: user revoked"
        );
        Response::json(200, json!({ "revoked": user, "realm": realm, "ttl": ttl }).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(bearer: Option<&str>) -> Request {
        Request {
            method: "GET".into(),
            path: "/v1/ice-servers".into(),
            query: String::new(),
            bearer: bearer.map(str::to_owned),
            body: Vec::new(),
            peer: None,
        }
    }

    #[test]
    fn the_token_is_compared_as_a_fixed_size_digest() {
        let token = "an-admin-token-of-some-length";
        let api = CredentialApi::new(token.into(), None, (&[], &[], &[]), None, IpAddr::from([127, 0, 0, 1]));
        assert!(api.authorized(&request(Some(token))));
        for wrong in [
            "",
            "a",
            &token[..token.len() - 1],
            &format!("{token}x"),
            "an-admin-token-of-some-lengtH",
        ] {
            assert!(!api.authorized(&request(Some(wrong))), "{wrong:?}");
        }
        assert!(!api.authorized(&request(None)));
        // Only the digest is kept: nothing of the token's length is left to compare.
        assert_eq!(std::mem::size_of_val(&api.token_digest), 32);
    }
}
