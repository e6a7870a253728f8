//! Redis online store: each row is a hash `{_ts, feature -> encoded value}`.

use std::time::Duration;

use async_trait::async_trait;
use deadpool::managed::{self, Object, Pool, RecycleResult};
use deadpool::Runtime;
use redis::aio::MultiplexedConnection;
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

/// One `HMGET key _ts f1 f2 ...` per lookup (the read protocol, shared
/// with the cluster store).
pub(super) fn read_pipeline<'a>(
    lookups: impl IntoIterator<Item = &'a Lookup<'a>>,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for l in lookups {
        pipe.cmd("HMGET").arg(l.key).arg(TS_FIELD).arg(l.features);
    }
    pipe
}

/// Decodes the replies of [`read_pipeline`].
pub(super) fn parse_rows(
    replies: Vec<Vec<Option<Vec<u8>>>>,
    expected: usize,
) -> Result<Vec<Option<StoredRow>>> {
    if replies.len() != expected {
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

/// One run of [`WRITE_SCRIPT`] per row: `EVALSHA` normally, `EVAL` with the
/// source when the server's script cache is empty (after a restart).
pub(super) fn write_pipeline<'a>(
    rows: impl IntoIterator<Item = &'a WriteRow>,
    script: &Script,
    eval_source: bool,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for r in rows {
        let cmd = pipe.cmd(if eval_source { "EVAL" } else { "EVALSHA" });
        cmd.arg(if eval_source {
            WRITE_SCRIPT
        } else {
            script.get_hash()
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
}

/// The script of [`write_pipeline`].
pub(super) fn write_script() -> Script {
    Script::new(WRITE_SCRIPT)
}

/// Counts written (1) and stale (0) script results.
pub(super) fn outcome(results: &[i64]) -> WriteOutcome {
    let written = results.iter().filter(|&&r| r == 1).count() as u64;
    WriteOutcome {
        written,
        stale: results.len() as u64 - written,
    }
}

/// Settings of [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]` (built without TLS support).
    pub url: String,
    /// Maximum pooled connections.
    pub pool_size: usize,
    /// Deadline of every call, including waiting for a pooled connection.
    pub timeout: Duration,
}

/// Opens multiplexed connections for the pool.
///
/// deadpool-redis's manager checks every connection on checkout with an
/// `UNWATCH` + `PING` round trip, which would double the round trips of each
/// request. This manager recycles for free instead; a connection that failed
/// with an I/O error is taken out of the pool by [`RedisStore`] (see
/// `discard_if_broken`), so a Redis restart still heals without a restart of ours.
struct Manager {
    client: redis::Client,
}

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.client.get_multiplexed_async_connection().await
    }

    async fn recycle(
        &self,
        _: &mut MultiplexedConnection,
        _: &managed::Metrics,
    ) -> RecycleResult<RedisError> {
        Ok(())
    }
}

type Conn = Object<Manager>;

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout()
}

/// Drops a connection from the pool after a connection-level error, so the
/// next checkout opens a fresh one.
fn discard_if_broken(conn: Conn, e: &RedisError) {
    if is_connection_error(e) {
        let _ = Object::take(conn);
    }
}

/// Online store on Redis, see the module docs of [`crate::store`].
pub struct RedisStore {
    pool: Pool<Manager>,
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

pub(super) fn redis_error(e: RedisError) -> Error {
    if is_connection_error(&e) {
        Error::unavailable(format!("redis is unreachable: {e}"))
    } else {
        Error::unavailable(format!("redis refused the operation: {e}"))
    }
}

impl RedisStore {
    /// Creates the pool. Does not connect; connections open on first use,
    /// so a server that starts before Redis still comes up (not ready).
    pub fn new(cfg: &RedisConfig) -> Result<RedisStore> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            Error::invalid(format!("invalid redis url ({}): {e}", redact(&cfg.url)))
        })?;
        let pool = Pool::builder(Manager { client })
            .max_size(cfg.pool_size.max(1))
            .wait_timeout(Some(cfg.timeout))
            .create_timeout(Some(cfg.timeout))
            .recycle_timeout(Some(cfg.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::invalid(format!("invalid redis pool configuration: {e}")))?;
        Ok(RedisStore {
            pool,
            timeout: cfg.timeout,
            write_script: write_script(),
        })
    }

    async fn conn(&self) -> Result<Conn> {
        self.pool.get().await.map_err(|e| match e {
            managed::PoolError::Backend(e) => redis_error(e),
            other => Error::unavailable(format!("no redis connection available: {other}")),
        })
    }

    /// Runs a pipeline on a pooled connection. The outer error is the pool's
    /// (no connection); the inner one is Redis's, after which a connection
    /// that broke is discarded instead of returned to the pool.
    async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<std::result::Result<T, RedisError>> {
        let mut conn = self.conn().await?;
        let result = pipe.query_async(&mut *conn).await;
        if let Err(e) = &result {
            discard_if_broken(conn, e);
        }
        Ok(result)
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
        let pipe = read_pipeline(lookups);
        let replies = with_deadline("redis", self.timeout, async {
            self.pipeline(&pipe).await?.map_err(redis_error)
        })
        .await?;
        parse_rows(replies, lookups.len())
    }

    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let results: Vec<i64> = with_deadline("redis", self.timeout, async {
            match self
                .pipeline(&write_pipeline(rows, &self.write_script, false))
                .await?
            {
                Ok(r) => Ok(r),
                // First use after a Redis restart: the script cache is empty.
                // EVAL both runs and caches it; later calls use EVALSHA again.
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => self
                    .pipeline(&write_pipeline(rows, &self.write_script, true))
                    .await?
                    .map_err(redis_error),
                Err(e) => Err(redis_error(e)),
            }
        })
        .await?;
        Ok(outcome(&results))
    }

    async fn ping(&self) -> Result<()> {
        with_deadline("redis", self.timeout, async {
            let mut pipe = redis::pipe();
            pipe.cmd("PING");
            let _: (String,) = self.pipeline(&pipe).await?.map_err(redis_error)?;
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
