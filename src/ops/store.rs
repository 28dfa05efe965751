//! The fleet store: users and REST secrets shared by every node, read from
//! Redis in coturn's own layout, so a coturn fleet's database and
//! `turnadmin` keep working unchanged:
//!
//! - `turn/realm/<realm>/user/<name>/key`: hex of the MD5 long-term key,
//!   MD5(name:realm:password), as `turnadmin -a -N …` writes it;
//! - `turn/realm/<realm>/secret`: a set of REST secrets
//!   (`turnadmin -s SECRET -N …`).
//!
//! The whole of it is read once a second and handed to the workers as a
//! reload would; nothing on the packet path ever touches the store.
//!
//! Fleet-wide quotas: every second each node writes what it holds, per user
//! and in total, as a lease (`turnstile/node/<id>/quota`, a hash, expiring
//! after [`LEASE`]) and reads the others' leases into its quota checks. A
//! node that dies stops holding quota when its lease runs out; two nodes
//! granting the last place within the same second may overshoot by one.
//!
//! When Redis is away the last contents stay in force (users seen before
//! keep authenticating), quotas count this node alone, the outage is logged
//! once, and `turnstile_store_up` says 0 until it is back.

use std::rc::Rc;
use std::time::Duration;

use crate::io::{Started, StoreContents};

/// How often the store is read.
pub const POLL: Duration = Duration::from_secs(1);

/// How long a node's quota lease outlives its last renewal.
pub const LEASE: Duration = Duration::from_secs(10);

/// Follows the store at `url` for as long as the process runs; `node`
/// names this node's lease.
pub async fn follow(url: String, realm: String, node: String, started: Rc<Started>) {
    let client = match redis::Client::open(url.as_str()) {
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
                    let (per_user, total) = started.quotas.local();
                    let others = lease(c, &node, &per_user, total).await?;
                    Ok((read(c, &realm).await?, others))
                }
                None => Err(redis::RedisError::from((redis::ErrorKind::IoError, "not connected"))),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok((contents, (others, others_total)))) => {
                started.quotas.set_remote(others, others_total);
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
                if let Err(e) = started.set_store(contents) {
                    tracing::warn!("store: applying its contents: {e}");
                }
            }
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 5 s".to_owned(),
                };
                connection = None;
                // Alone until the store is back: quotas count this node only.
                started.quotas.set_remote(Default::default(), 0);
                if up != Some(false) {
                    tracing::warn!("store unreachable ({why}); serving the users and secrets read last, retrying");
                    metrics::gauge!("turnstile_store_up").set(0.0);
                    up = Some(false);
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Renews this node's quota lease and sums the other nodes' leases.
async fn lease(
    c: &mut redis::aio::MultiplexedConnection,
    node: &str,
    per_user: &[(String, u32)],
    total: u32,
) -> redis::RedisResult<(std::collections::HashMap<String, u32>, u32)> {
    let mine = format!("turnstile/node/{node}/quota");
    let mut p = redis::pipe();
    p.atomic().del(&mine).hset(&mine, "", total);
    for (user, n) in per_user {
        p.hset(&mine, format!("user/{user}"), *n);
    }
    p.expire(&mine, LEASE.as_secs() as i64);
    p.query_async::<()>(c).await?;

    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("turnstile/node/*/quota")
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        keys.extend(batch.into_iter().filter(|k| *k != mine));
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    let mut others = std::collections::HashMap::new();
    let mut others_total = 0u32;
    for key in keys {
        let fields: std::collections::HashMap<String, u32> = redis::cmd("HGETALL").arg(&key).query_async(c).await?;
        for (field, n) in fields {
            match field.strip_prefix("user/") {
                Some(user) => *others.entry(user.to_owned()).or_insert(0) += n,
                None if field.is_empty() => others_total += n,
                None => {}
            }
        }
    }
    Ok((others, others_total))
}

/// Reads every user key and REST secret of `realm`.
async fn read(c: &mut redis::aio::MultiplexedConnection, realm: &str) -> redis::RedisResult<StoreContents> {
    let prefix = format!("turn/realm/{realm}/user/");
    let pattern = format!("{prefix}*/key");
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
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
    Ok(StoreContents { users, secrets })
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
