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
//! reload would; nothing on the packet path ever touches the store. When
//! Redis is away the last contents stay in force (users seen before keep
//! authenticating), the outage is logged once, and `turnstile_store_up`
//! says 0 until it is back.

use std::rc::Rc;
use std::time::Duration;

use crate::io::{Started, StoreContents};

/// How often the store is read.
pub const POLL: Duration = Duration::from_secs(1);

/// Follows the store at `url` for as long as the process runs.
pub async fn follow(url: String, realm: String, started: Rc<Started>) {
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
                Some(c) => read(c, &realm).await,
                None => Err(redis::RedisError::from((redis::ErrorKind::IoError, "not connected"))),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(contents)) => {
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
