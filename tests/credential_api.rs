//! The credential API on the admin listener: short-lived REST credentials
//! as RTCIceServer JSON (turnstile's shape and a hosted service's shape),
//! bearer-token protected, and credentials that a TURN client can use.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{TestServer, loopback_config};

const TOKEN: &str = "admin-token-0123456789";

fn config(secrets: &str) -> String {
    loopback_config(&format!(
        r#"
[[listen]]
transport = "tcp"
address = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[relay]
address = "127.0.0.1"
ports = "62500-62999"

[auth]
secrets = [{secrets}]

[peers]
allow = ["127.0.0.0/8"]
"#
    ))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn ice_servers_need_the_token_and_carry_every_listener() {
    let server = TestServer::start(&config("\"app-secret\""));
    assert_eq!(server.admin_request("GET", "/v1/ice-servers", None, "").0, 401);
    assert_eq!(
        server
            .admin_request("GET", "/v1/ice-servers", Some("wrong-token-0123456789"), "")
            .0,
        401
    );

    let (status, body) = server.admin_request(
        "GET",
        "/v1/ice-servers?ttl=600&user=@alice:example.org",
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ttl"], 600);
    let s = &v["iceServers"][0];
    let urls: Vec<&str> = s["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let (udp, tcp) = (server.udp[0], server.tcp[0]);
    assert!(urls.contains(&format!("stun:{udp}").as_str()), "{urls:?}");
    assert!(urls.contains(&format!("turn:{udp}?transport=udp").as_str()), "{urls:?}");
    assert!(urls.contains(&format!("turn:{tcp}?transport=tcp").as_str()), "{urls:?}");
    let username = s["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "@alice:example.org", "Matrix-style ids keep their colons");
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry.abs_diff(now() + 600) <= 5);
    assert_eq!(
        s["credential"].as_str().unwrap(),
        turnstile::proto::auth::rest::password(b"app-secret", username)
    );

    // Bad TTLs and unknown paths.
    assert_eq!(
        server.admin_request("GET", "/v1/ice-servers?ttl=0", Some(TOKEN), "").0,
        400
    );
    assert_eq!(
        server
            .admin_request("POST", "/v1/ice-servers", Some(TOKEN), "{\"ttl\": 99999999}")
            .0,
        400
    );
    assert_eq!(
        server
            .admin_request("POST", "/v1/ice-servers", Some(TOKEN), "not json")
            .0,
        400
    );
    assert_eq!(server.admin_request("GET", "/v2/nothing", Some(TOKEN), "").0, 404);
}

#[test]
fn hosted_service_shape() {
    let server = TestServer::start(&config("\"app-secret\""));
    let (status, body) = server.admin_request(
        "POST",
        "/v1/turn/keys/my-key-id/credentials/generate-ice-servers",
        Some(TOKEN),
        "{\"ttl\": 86400}",
    );
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let servers = v["iceServers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    assert!(servers[0]["urls"][0].as_str().unwrap().starts_with("stun:"));
    assert!(servers[0].get("username").is_none());
    assert!(
        servers[1]["urls"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u.as_str().unwrap().starts_with("turn"))
    );
    assert!(servers[1]["username"].as_str().unwrap().ends_with(":turnstile"));
}

#[test]
fn without_a_rest_secret_the_api_says_so() {
    let server = TestServer::start(&config(""));
    let (status, body) = server.admin_request("GET", "/v1/ice-servers", Some(TOKEN), "");
    assert_eq!(status, 503, "{body}");
}

/// Allocates with the webrtc-rs TURN client; returns the relayed address.
async fn allocate_with(server: &TestServer, username: String, password: String) -> std::net::SocketAddr {
    use turn::client::{Client, ClientConfig};
    use webrtc_util::Conn;

    let addr = server.udp[0].to_string();
    let client = Client::new(ClientConfig {
        stun_serv_addr: addr.clone(),
        turn_serv_addr: addr,
        username,
        password,
        realm: "test.local".into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()),
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    let relay = client.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    client.close().await.unwrap();
    relayed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_allocates_with_the_issued_credential() {
    let server = TestServer::start(&config("\"app-secret\""));
    let (_, body) = server.admin_request(
        "POST",
        "/v1/ice-servers",
        Some(TOKEN),
        "{\"ttl\": 300, \"user\": \"phone-42\"}",
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let s = &v["iceServers"][0];
    let username = s["username"].as_str().unwrap().to_owned();
    let password = s["credential"].as_str().unwrap().to_owned();
    let relayed = allocate_with(&server, username, password).await;
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
}

/// A Matrix homeserver (Synapse) computes TURN credentials itself from
/// `turn_shared_secret`: username "<expiry>:<mxid>", password
/// base64(HMAC-SHA1(secret, username)). The mxid's colons must survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_style_credentials_allocate() {
    let server = TestServer::start(&config("\"synapse-shared-secret\""));
    let username = format!("{}:@alice:example.org", now() + 86_400);
    let password = turnstile::proto::auth::rest::password(b"synapse-shared-secret", &username);
    let relayed = allocate_with(&server, username, password).await;
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
}
