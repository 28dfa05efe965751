//! The fleet store: users and REST secrets shared by every node, read from
//! Redis in coturn's own layout, so a coturn fleet's database and
//! `turnadmin` keep working unchanged:
//!
//! - `turn/realm/<realm>/user/<name>/key`: hex of the MD5 long-term key,
//!   MD5(name:realm:password), as `turnadmin -a -N …` writes it;
//! - `turn/realm/<realm>/secret`: a set of REST secrets
//!   (`turnadmin -s SECRET -N …`),
//!
//! for the default realm and each other `[[realm]]` (`turnadmin -r REALM`).
//!
//! The whole of it is read once a second and handed to the workers as a
//! reload would; nothing on the packet path ever touches the store.
//!
//! Fleet-wide quotas: every second each node writes what it holds, per user
//! (of each realm), per realm and in total, as a lease (`turnstile/node/<id>/quota`, a hash, expiring
//! after [`LEASE`]) and reads the others' leases into its quota checks. A
//! node that dies stops holding quota when its lease runs out; two nodes
//! granting the last place within the same second may overshoot by one.
//!
//! When Redis is away the last contents stay in force (users seen before
//! keep authenticating), quotas count this node alone, the outage is logged
//! once, and `turnstile_store_up` says 0 until it is back.

use std::rc::Rc;
use std::time::Duration;

use crate::io::StoreContents;
use crate::ops::fleet::Fleet;
use crate::proto::server::FleetCounts;

/// How often the store is read.
pub const POLL: Duration = Duration::from_secs(1);

/// How long a node's quota lease outlives its last renewal.
pub const LEASE: Duration = Duration::from_secs(10);

/// Follows the store at `url` for as long as the process runs.
pub async fn follow(store: crate::config::Store, realm: String, fleet: Rc<Fleet>, started: Rc<crate::io::Started>) {
    let node = fleet.node.clone();
    let me = Node {
        address: fleet.address,
        draining: false,
        total: 0,
    };
    let mut alternate: Option<std::net::SocketAddr> = None;
    let mut statuses = started.statuses.lock().ok().and_then(|mut s| s.take());
    let client = match redis::Client::open(store.redis.as_str()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("store: {e}");
            return;
        }
    };
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut up: Option<bool> = None;
    let mut backoff = POLL;
    loop {
        let read = async {
            if connection.is_none() {
                connection = Some(client.get_multiplexed_async_connection().await?);
            }
            match connection.as_mut() {
                Some(c) => {
                    if let Some(rx) = statuses.as_mut() {
                        publish_statuses(c, &realm, rx).await?;
                    }
                    let local = started.quotas.local();
                    let me = Node {
                        draining: started.is_draining(),
                        total: local.total,
                        ..me
                    };
                    let others = lease(c, &node, &me, &realm, &local).await?;
                    let (revocations, kicks) = fleet.take_outbox();
                    let mine = allocations_json(&started, &node);
                    let exchanged = exchange(c, &node, &revocations, &kicks, &mine).await;
                    if exchanged.is_err() {
                        // Not written: try again next time.
                        for (scoped, ttl) in revocations {
                            fleet.revoke_scoped(scoped, ttl);
                        }
                    }
                    let (revoked, posted, lists) = exchanged?;
                    let mut contents = read(c, &realm).await?;
                    for name in started.other_realms() {
                        let other = read(c, &name).await?;
                        contents.realms.push(crate::io::RealmContents {
                            name,
                            users: other.users,
                            secrets: other.secrets,
                        });
                    }
                    contents.revoked = revoked;
                    Ok((contents, others, posted, lists))
                }
                None => Err(redis::RedisError::from((redis::ErrorKind::IoError, "not connected"))),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok((contents, (others, nodes), kicks, lists))) => {
                started.quotas.set_remote(others);
                let best = if store.redirect { least_loaded(&nodes) } else { None };
                if best != alternate {
                    alternate = best;
                    started.set_fleet_alternate(best);
                }
                fleet.store_read(contents.clone(), kicks, lists);
                if up != Some(true) {
                    tracing::info!(
                        users = contents.users.len(),
                        secrets = contents.secrets.len(),
                        "store reachable"
                    );
                    metrics::gauge!("turnstile_store_up").set(1.0);
                    up = Some(true);
                }
                backoff = POLL;
            }
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 5 s".to_owned(),
                };
                connection = None;
                // Alone until the store is back: quotas count this node only,
                // and no other node is known to take Allocates.
                started.quotas.set_remote(FleetCounts::default());
                if alternate.take().is_some() {
                    started.set_fleet_alternate(None);
                }
                fleet.store_lost();
                if up != Some(false) {
                    tracing::warn!("store unreachable ({why}); serving the users and secrets read last, retrying");
                    metrics::gauge!("turnstile_store_up").set(0.0);
                    up = Some(false);
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        fleet.tick();
        tokio::time::sleep(backoff).await;
    }
}

/// Writes and announces allocation statuses in coturn's statistics layout:
/// `turn/realm/<realm>/user/<user>/allocation/<id>/status` holds "new
/// lifetime=N" or "refreshed lifetime=N" (expiring with the allocation) and
/// the same is published on that key, then "deleted"; at the end the
/// totals are published on `…/total_traffic` as "rcvp=…, rcvb=…, sentp=…,
/// sentb=…" (received from and sent to the client), and on `…/traffic`.
async fn publish_statuses(
    c: &mut redis::aio::MultiplexedConnection,
    realm: &str,
    rx: &mut tokio::sync::mpsc::Receiver<crate::io::executor::AllocationStatus>,
) -> redis::RedisResult<()> {
    use crate::io::executor::StatusChange;
    let mut p = redis::pipe();
    let mut any = false;
    while let Ok(s) = rx.try_recv() {
        any = true;
        let realm = if s.realm.is_empty() { realm } else { s.realm.as_str() };
        let base = format!("turn/realm/{realm}/user/{}/allocation/{:018}", s.user, s.id);
        let status = format!("{base}/status");
        match s.change {
            StatusChange::New { lifetime } | StatusChange::Refreshed { lifetime } => {
                let word = if matches!(s.change, StatusChange::New { .. }) {
                    "new"
                } else {
                    "refreshed"
                };
                let value = format!("{word} lifetime={lifetime}");
                p.set_ex(&status, &value, lifetime.max(1)).publish(&status, &value);
            }
            StatusChange::Deleted { traffic: t } => {
                let totals = format!(
                    "rcvp={}, rcvb={}, sentp={}, sentb={}",
                    t.to_peer_packets, t.to_peer_bytes, t.to_client_packets, t.to_client_bytes
                );
                p.del(&status)
                    .publish(&status, "deleted")
                    .publish(format!("{base}/traffic"), &totals)
                    .publish(format!("{base}/total_traffic"), &totals);
            }
        }
    }
    if any {
        p.query_async::<()>(c).await?;
    }
    Ok(())
}

/// This node's allocations as the admin API lists them.
fn allocations_json(started: &crate::io::Started, node: &str) -> String {
    let list: Vec<serde_json::Value> = started
        .allocations()
        .iter()
        .map(|a| crate::ops::admin::allocation_json(a, node))
        .collect();
    serde_json::Value::Array(list).to_string()
}

type Exchanged = (
    Vec<String>,
    Vec<(String, String)>,
    Vec<(String, Vec<serde_json::Value>)>,
);

/// Writes this node's revocations, kicks and allocation list; reads every
/// revocation in force, the other nodes' kicks and allocation lists.
async fn exchange(
    c: &mut redis::aio::MultiplexedConnection,
    node: &str,
    revocations: &[(String, u64)],
    kicks: &[String],
    allocations: &str,
) -> redis::RedisResult<Exchanged> {
    let mut p = redis::pipe();
    for (user, ttl) in revocations {
        p.set_ex(format!("turnstile/revoked/{user}"), node, (*ttl).max(1));
    }
    for (i, user) in kicks.iter().enumerate() {
        let id = format!(
            "{}-{i}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        p.set_ex(format!("turnstile/kick/{node}/{id}"), user, 10);
    }
    p.set_ex(
        format!("turnstile/node/{node}/allocations"),
        allocations,
        LEASE.as_secs(),
    );
    p.query_async::<()>(c).await?;

    let revoked: Vec<String> = scan(c, "turnstile/revoked/*")
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix("turnstile/revoked/").map(str::to_owned))
        .collect();
    let own_kicks = format!("turnstile/kick/{node}/");
    let kick_keys: Vec<String> = scan(c, "turnstile/kick/*")
        .await?
        .into_iter()
        .filter(|k| !k.starts_with(&own_kicks))
        .collect();
    let mut posted = Vec::new();
    if !kick_keys.is_empty() {
        let users: Vec<Option<String>> = redis::cmd("MGET").arg(&kick_keys).query_async(c).await?;
        for (key, user) in kick_keys.into_iter().zip(users) {
            if let Some(user) = user {
                posted.push((key, user));
            }
        }
    }
    let mine = format!("turnstile/node/{node}/allocations");
    let list_keys: Vec<String> = scan(c, "turnstile/node/*/allocations")
        .await?
        .into_iter()
        .filter(|k| *k != mine)
        .collect();
    let mut lists = Vec::new();
    if !list_keys.is_empty() {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&list_keys).query_async(c).await?;
        for (key, value) in list_keys.iter().zip(values) {
            let name = key
                .strip_prefix("turnstile/node/")
                .and_then(|k| k.strip_suffix("/allocations"))
                .unwrap_or_default()
                .to_owned();
            if let Some(list) = value.and_then(|v| serde_json::from_str::<Vec<serde_json::Value>>(&v).ok()) {
                lists.push((name, list));
            }
        }
    }
    Ok((revoked, posted, lists))
}

/// Every key matching `pattern` (SCAN, never KEYS).
async fn scan(c: &mut redis::aio::MultiplexedConnection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// A node as its lease describes it.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub address: Option<std::net::SocketAddr>,
    pub draining: bool,
    /// Allocations it holds.
    pub total: u32,
}

/// The live node with the fewest allocations that is not draining.
fn least_loaded(nodes: &[Node]) -> Option<std::net::SocketAddr> {
    nodes
        .iter()
        .filter(|n| !n.draining)
        .filter_map(|n| n.address.map(|a| (n.total, a)))
        .min()
        .map(|(_, a)| a)
}

/// Lease field of a user's count in a realm other than the default: the
/// JSON pair after a prefix, since either name may hold any character. The
/// default realm's users keep the `user/<name>` fields earlier versions read.
fn realm_user_field(realm: &str, user: &str) -> String {
    format!("realm-user/{}", serde_json::json!([realm, user]))
}

/// Renews this node's lease (its quota holdings, address and state) and
/// reads the other nodes' leases: what they hold together, and each node.
async fn lease(
    c: &mut redis::aio::MultiplexedConnection,
    node: &str,
    me: &Node,
    default_realm: &str,
    local: &FleetCounts,
) -> redis::RedisResult<(FleetCounts, Vec<Node>)> {
    let mine = format!("turnstile/node/{node}/quota");
    let mut p = redis::pipe();
    p.atomic()
        .del(&mine)
        .hset(&mine, "", me.total)
        .hset(&mine, "draining", u8::from(me.draining));
    if let Some(a) = me.address {
        p.hset(&mine, "addr", a.to_string());
    }
    for ((realm, user), n) in &local.users {
        if realm == default_realm {
            p.hset(&mine, format!("user/{user}"), *n);
        } else {
            p.hset(&mine, realm_user_field(realm, user), *n);
        }
    }
    for (realm, n) in &local.realms {
        p.hset(&mine, format!("realm/{realm}"), *n);
    }
    p.expire(&mine, LEASE.as_secs() as i64);
    p.query_async::<()>(c).await?;

    let keys: Vec<String> = scan(c, "turnstile/node/*/quota")
        .await?
        .into_iter()
        .filter(|k| *k != mine)
        .collect();
    let mut others = FleetCounts::default();
    let mut nodes = Vec::new();
    for key in keys {
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(c).await?;
        let mut n = Node {
            address: None,
            draining: false,
            total: 0,
        };
        for (field, value) in fields {
            let count = value.parse::<u32>().unwrap_or(0);
            let user = if let Some(user) = field.strip_prefix("user/") {
                Some((default_realm.to_owned(), user.to_owned()))
            } else if let Some(pair) = field.strip_prefix("realm-user/") {
                serde_json::from_str::<(String, String)>(pair).ok()
            } else {
                None
            };
            if let Some(user) = user {
                *others.users.entry(user).or_insert(0) += count;
            } else if let Some(realm) = field.strip_prefix("realm/") {
                *others.realms.entry(realm.to_owned()).or_insert(0) += count;
            } else if field.is_empty() {
                n.total = count;
            } else if field == "addr" {
                n.address = value.parse().ok();
            } else if field == "draining" {
                n.draining = value == "1";
            }
        }
        others.total += n.total;
        nodes.push(n);
    }
    Ok((others, nodes))
}

/// Reads every user key and REST secret of `realm`.
async fn read(c: &mut redis::aio::MultiplexedConnection, realm: &str) -> redis::RedisResult<StoreContents> {
    let prefix = format!("turn/realm/{realm}/user/");
    let keys = scan(c, &format!("{prefix}*/key")).await?;
    let mut users = Vec::with_capacity(keys.len());
    if !keys.is_empty() {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(c).await?;
        for (key, value) in keys.iter().zip(values) {
            let name = key.strip_prefix(&prefix).and_then(|k| k.strip_suffix("/key"));
            match (name, value.as_deref().and_then(md5_key)) {
                (Some(name), Some(k)) if !name.is_empty() => users.push((name.to_owned(), k)),
                _ => tracing::debug!(key, "store: not a user key (hex of 16 bytes expected)"),
            }
        }
    }
    let mut secrets: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("turn/realm/{realm}/secret"))
        .query_async(c)
        .await?;
    secrets.sort();
    Ok(StoreContents {
        users,
        secrets,
        revoked: Vec::new(),
        realms: Vec::new(),
    })
}

/// The 16 bytes of a key written as 32 hex digits (either case).
fn md5_key(hex: &str) -> Option<[u8; 16]> {
    let hex = hex.trim();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::md5_key;

    #[test]
    fn keys_are_32_hex_digits() {
        let k = md5_key("0123456789abcdefABCDEF0123456789").unwrap();
        assert_eq!(k[0], 0x01);
        assert_eq!(k[15], 0x89);
        assert!(md5_key("0123").is_none());
        assert!(md5_key("zz23456789abcdefABCDEF0123456789").is_none());
        assert!(md5_key("0123456789abcdefABCDEF012345678é").is_none());
    }
}
