//! Redis online store: each row is a hash `{_ts, feature -> encoded value}`.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::{RedisError, Script};

use super::{with_deadline, Lookup, OnlineStore, StoredRow, WriteOutcome, WriteRow};
use crate::codec::{decode_value, encode_value};
use crate::error::{Error, Result};

/// Hash field holding the row's event time (decimal epoch micros). Feature
/// names cannot start with `_`, so it never collides with a feature.
const TS_FIELD: &str = "_ts";

/// Event-time last-write-wins, atomic on the server.
/// KEYS[1]: row key. ARGV[1]: event time (micros). ARGV[2]: expire-at in
/// epoch milliseconds, 0 for none. ARGV[3..]: field, value pairs.
/// Returns 1 when written, 0 when a newer row is stored.
const WRITE_SCRIPT: &str = r#"
local cur = redis.call('HGET', KEYS[1], '_ts')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_ts', ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local exp = tonumber(ARGV[2])
if exp > 0 then redis.call('PEXPIREAT', KEYS[1], exp) end
return 1
"#;

/// Settings of [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// Maximum pooled connections.
    pub pool_size: usize,
    /// Deadline of every call, including waiting for a pooled connection.
    pub timeout: Duration,
}

/// Online store on Redis, see the module docs of [`crate::store`].
pub struct RedisStore {
    pool: Pool,
    timeout: Duration,
    write_script: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn redis_error(e: RedisError) -> Error {
    if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout() {
        Error::unavailable(format!("redis is unreachable: {e}"))
    } else {
        Error::unavailable(format!("redis refused the operation: {e}"))
    }
}

impl RedisStore {
    /// Creates the pool. Does not connect; connections open on first use,
    /// so a server that starts before Redis still comes up (not ready).
    pub fn new(cfg: &RedisConfig) -> Result<RedisStore> {
        let mut pc = deadpool_redis::Config::from_url(cfg.url.clone());
        let mut pool = PoolConfig::new(cfg.pool_size.max(1));
        pool.timeouts = Timeouts {
            wait: Some(cfg.timeout),
            create: Some(cfg.timeout),
            recycle: Some(cfg.timeout),
        };
        pc.pool = Some(pool);
        let pool = pc.create_pool(Some(Runtime::Tokio1)).map_err(|e| {
            Error::invalid(format!(
                "invalid redis configuration ({}): {e}",
                redact(&cfg.url)
            ))
        })?;
        Ok(RedisStore {
            pool,
            timeout: cfg.timeout,
            write_script: Script::new(WRITE_SCRIPT),
        })
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_redis::PoolError::Backend(e) => redis_error(e),
            other => Error::unavailable(format!("no redis connection available: {other}")),
        })
    }
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[async_trait]
impl OnlineStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn read(&self, lookups: &[Lookup<'_>]) -> Result<Vec<Option<StoredRow>>> {
        if lookups.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for l in lookups {
            pipe.cmd("HMGET").arg(l.key).arg(TS_FIELD).arg(l.features);
        }
        let replies: Vec<Vec<Option<Vec<u8>>>> = with_deadline("redis", self.timeout, async {
            let mut conn = self.conn().await?;
            pipe.query_async(&mut conn).await.map_err(redis_error)
        })
        .await?;
        if replies.len() != lookups.len() {
            return Err(Error::internal(
                "redis pipeline returned a wrong number of replies",
            ));
        }
        replies
            .into_iter()
            .map(|fields| {
                let mut it = fields.into_iter();
                let Some(Some(ts)) = it.next() else {
                    return Ok(None);
                };
                let event_ts = std::str::from_utf8(&ts)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| Error::internal("corrupt stored value: bad _ts field"))?;
                let values = it
                    .map(|raw| raw.map(|b| decode_value(&b)).transpose())
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(StoredRow { event_ts, values }))
            })
            .collect()
    }

    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let hash = self.write_script.get_hash().to_owned();
        let build = |eval_source: bool| {
            let mut pipe = redis::pipe();
            for r in rows {
                let cmd = pipe.cmd(if eval_source { "EVAL" } else { "EVALSHA" });
                cmd.arg(if eval_source {
                    WRITE_SCRIPT
                } else {
                    hash.as_str()
                })
                .arg(1)
                .arg(&r.key)
                .arg(r.event_ts)
                .arg(r.expire_at.map_or(0, |m| m.div_euclid(1000).max(1)));
                for (name, v) in &r.features {
                    cmd.arg(name).arg(encode_value(v));
                }
            }
            pipe
        };
        let results: Vec<i64> = with_deadline("redis", self.timeout, async {
            let mut conn = self.conn().await?;
            match build(false).query_async(&mut conn).await {
                Ok(r) => Ok(r),
                // First use after a Redis restart: the script cache is empty.
                // EVAL both runs and caches it; later calls use EVALSHA again.
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => build(true)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error),
                Err(e) => Err(redis_error(e)),
            }
        })
        .await?;
        let written = results.iter().filter(|&&r| r == 1).count() as u64;
        Ok(WriteOutcome {
            written,
            stale: rows.len() as u64 - written,
        })
    }

    async fn ping(&self) -> Result<()> {
        with_deadline("redis", self.timeout, async {
            let mut conn = self.conn().await?;
            let _: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:s3cret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}
