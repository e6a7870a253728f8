//! Redis online store: each row is a hash `{_ts, feature -> encoded value}`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use deadpool::managed::{self, Object, Pool, RecycleResult};
use deadpool::Runtime;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};

use super::{with_deadline, Lookup, OnlineStore, StoredRow, TileWrite, WriteOutcome, WriteRow};
use crate::aggregate::{event_time_field, offset_field};
use crate::codec::{decode_value, encode_value, event_ids_key};
use crate::error::{Error, Result};

/// Hash field holding the row's event time (decimal epoch micros). Feature
/// names cannot start with `_`, so it never collides with a feature.
const TS_FIELD: &str = "_ts";

/// Lua helpers of both scripts. `cmp_int` compares two decimal integers
/// (as Rust writes them: no leading zeros) exactly: Lua numbers are
/// doubles, which cannot tell event times 1 µs apart after the year 2255.
/// `byte_less` (and `hex_less`, for digests) compares strings byte by byte:
/// Lua's `<` on strings follows the server's collation locale.
macro_rules! lua_helpers {
    () => {
        r#"
local function cmp_int(a, b)
  local na, nb = string.byte(a, 1) == 45, string.byte(b, 1) == 45
  if na ~= nb then return na and -1 or 1 end
  if a == b then return 0 end
  local c = 1
  if #a ~= #b then
    if #a < #b then c = -1 end
  else
    for i = 1, #a do
      local x, y = string.byte(a, i), string.byte(b, i)
      if x ~= y then
        if x < y then c = -1 end
        break
      end
    end
  end
  if na then c = -c end
  return c
end
local function byte_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local hex_less = byte_less
-- Lua's C stack takes at most 8000 values (LUAI_MAXCSTACK): one command
-- gets at most this many arguments from unpack (even, so pairs stay whole).
local UNPACK_MAX = 1000
"#
    };
}

/// Event-time last-write-wins with the tie-break of
/// [`crate::store::replaces`], atomic on the server. KEYS[1]: row key.
/// ARGV[1]: event time (micros). ARGV[2]: expire-at in epoch milliseconds,
/// 0 for none. ARGV[3..]: field, value pairs (each field once). On a tie
/// both rows' digests ([`crate::codec::tie_digest`]) cover the union of
/// their fields in byte order, a missing field counting as null (encoded
/// `\x01\x00`). Returns 1 when written, 0 when the stored row is newer or
/// wins the tie.
const WRITE_SCRIPT: &str = concat!(
    lua_helpers!(),
    r#"
local cur = redis.call('HGET', KEYS[1], '_ts')
if cur then
  local c = cmp_int(cur, ARGV[1])
  if c > 0 then return 0 end
  if c == 0 then
    local null = string.char(1, 0)
    local new, names = {}, {}
    for i = 3, #ARGV, 2 do
      new[ARGV[i]] = ARGV[i + 1]
      names[#names + 1] = ARGV[i]
    end
    local old = {}
    local stored = redis.call('HGETALL', KEYS[1])
    for i = 1, #stored, 2 do
      local f = stored[i]
      if f ~= '_ts' then
        old[f] = stored[i + 1]
        if not new[f] then names[#names + 1] = f end
      end
    end
    table.sort(names, byte_less)
    local a, b = {}, {}
    for i, f in ipairs(names) do
      a[i] = new[f] or null
      b[i] = old[f] or null
    end
    if hex_less(redis.sha1hex(table.concat(a)), redis.sha1hex(table.concat(b))) then
      return 0
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_ts', ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local exp = tonumber(ARGV[2])
if exp > 0 then redis.call('PEXPIREAT', KEYS[1], exp) end
return 1
"#
);

/// Applies [`TileWrite`]s, each at most once and atomically. KEYS: the
/// row keys, then their event-id rows' keys in the same order. ARGV, one
/// segment per row: offset field, offset, event-time field, event time,
/// expire-at (epoch ms), number of fields to delete, those fields, number
/// of fields to set, then field, value pairs; then the same two lists
/// (delete, set) for the event-id row, which takes the row's expiry.
/// Returns one integer per row: 1 when applied, 0 when the row already had
/// the offset.
/// Many rows per call amortise the script call (one per row would cost
/// Redis more than the work itself). Fields are set and deleted in
/// commands of at most `UNPACK_MAX` arguments, so a row update of any size
/// stays within Lua's stack (one `unpack` of all fields failed past ~4000).
const TILE_SCRIPT: &str = concat!(
    lua_helpers!(),
    r#"
if #KEYS % 2 ~= 0 then
  return redis.error_reply('ERR quiver tile script: expected row keys then their event-id keys')
end
local out = {}
local a = 1
local n = #KEYS / 2
for k = 1, n do
  local key = KEYS[k]
  local idkey = KEYS[n + k]
  local nd = tonumber(ARGV[a + 5])
  local nf = tonumber(ARGV[a + 6 + nd])
  local fields = a + 7 + nd
  local ia = fields + 2 * nf
  local nid = tonumber(ARGV[ia])
  local nis = tonumber(ARGV[ia + 1 + nid])
  local ifields = ia + 2 + nid
  local cur = redis.call('HGET', key, ARGV[a])
  if cur and cmp_int(cur, ARGV[a + 1]) >= 0 then
    out[k] = 0
  else
    for i = a + 6, a + 5 + nd, UNPACK_MAX do
      redis.call('HDEL', key, unpack(ARGV, i, math.min(i + UNPACK_MAX - 1, a + 5 + nd)))
    end
    local args = {ARGV[a], ARGV[a + 1]}
    local t = redis.call('HGET', key, ARGV[a + 2])
    if (not t) or cmp_int(t, ARGV[a + 3]) < 0 then
      args[#args + 1] = ARGV[a + 2]
      args[#args + 1] = ARGV[a + 3]
    end
    for i = fields, fields + 2 * nf - 1 do args[#args + 1] = ARGV[i] end
    for i = 1, #args, UNPACK_MAX do
      redis.call('HSET', key, unpack(args, i, math.min(i + UNPACK_MAX - 1, #args)))
    end
    local exp = tonumber(ARGV[a + 4])
    -- The event-id row lives and expires with the row: both are set
    -- together, so the row's TTL state is the id row's too.
    local fresh = redis.call('PTTL', key) < 0
    if fresh then
      redis.call('PEXPIREAT', key, exp)
    else
      redis.call('PEXPIREAT', key, exp, 'GT')
    end
    for i = ia + 1, ia + nid, UNPACK_MAX do
      redis.call('HDEL', idkey, unpack(ARGV, i, math.min(i + UNPACK_MAX - 1, ia + nid)))
    end
    if nis > 0 then
      local last = ifields + 2 * nis - 1
      for i = ifields, last, UNPACK_MAX do
        redis.call('HSET', idkey, unpack(ARGV, i, math.min(i + UNPACK_MAX - 1, last)))
      end
      if fresh or redis.call('PTTL', idkey) < 0 then
        redis.call('PEXPIREAT', idkey, exp)
      else
        redis.call('PEXPIREAT', idkey, exp, 'GT')
      end
    end
    out[k] = 1
  end
  a = ifields + 2 * nis
end
return out
"#
);

/// Rows per run of [`TILE_SCRIPT`].
const TILE_ROWS_PER_CALL: usize = 64;

/// One command per lookup (the read protocol, shared with the cluster
/// store): `HMGET key _ts f1 f2 ...` for feature rows, `HGETALL key` or
/// `HMGET key f1 ...` for tile rows.
pub(super) fn read_pipeline<'a>(
    lookups: impl IntoIterator<Item = &'a Lookup<'a>>,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for l in lookups {
        if !l.raw {
            pipe.cmd("HMGET").arg(l.key).arg(TS_FIELD).arg(l.features);
        } else if l.features.is_empty() {
            pipe.cmd("HGETALL").arg(l.key);
        } else {
            pipe.cmd("HMGET").arg(l.key).arg(l.features);
        }
    }
    pipe
}

fn bytes_of(v: redis::Value) -> Result<Option<Vec<u8>>> {
    match v {
        redis::Value::Nil => Ok(None),
        redis::Value::BulkString(b) => Ok(Some(b)),
        redis::Value::SimpleString(s) => Ok(Some(s.into_bytes())),
        _ => Err(Error::internal("redis returned an unexpected reply type")),
    }
}

fn parse_row(reply: redis::Value, l: &Lookup<'_>) -> Result<Option<StoredRow>> {
    let items = match reply {
        redis::Value::Array(items) => items,
        redis::Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        redis::Value::Nil => return Ok(None),
        _ => return Err(Error::internal("redis returned an unexpected reply type")),
    };
    if l.raw {
        let mut raw = Vec::new();
        if l.features.is_empty() {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let (Some(k), Some(v)) = (bytes_of(k)?, bytes_of(v)?) else {
                    continue;
                };
                raw.push((String::from_utf8_lossy(&k).into_owned(), v));
            }
        } else {
            for (name, v) in l.features.iter().zip(items) {
                if let Some(v) = bytes_of(v)? {
                    raw.push(((*name).to_owned(), v));
                }
            }
        }
        return Ok((!raw.is_empty()).then(|| StoredRow {
            raw,
            ..StoredRow::default()
        }));
    }
    let mut it = items.into_iter();
    let Some(Some(ts)) = it.next().map(bytes_of).transpose()? else {
        return Ok(None);
    };
    let event_ts = std::str::from_utf8(&ts)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::internal("corrupt stored value: bad _ts field"))?;
    let values = it
        .map(|raw| bytes_of(raw)?.map(|b| decode_value(&b)).transpose())
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(StoredRow {
        event_ts,
        values,
        raw: Vec::new(),
    }))
}

/// Decodes the replies of [`read_pipeline`] for `lookups`.
pub(super) fn parse_rows<'a>(
    replies: Vec<redis::Value>,
    lookups: impl ExactSizeIterator<Item = &'a Lookup<'a>>,
) -> Result<Vec<Option<StoredRow>>> {
    if replies.len() != lookups.len() {
        return Err(Error::internal(
            "redis pipeline returned a wrong number of replies",
        ));
    }
    replies
        .into_iter()
        .zip(lookups)
        .map(|(r, l)| parse_row(r, l))
        .collect()
}

/// Runs of [`TILE_SCRIPT`] over `writes`, [`TILE_ROWS_PER_CALL`] rows each,
/// by `EVALSHA` (`with_source`: the first by `EVAL`, see
/// [`LuaScript::call`]). On a cluster, pass writes of one hash slot only.
pub(super) fn tile_pipeline<'a>(
    writes: impl IntoIterator<Item = &'a TileWrite>,
    script: &LuaScript,
    with_source: bool,
) -> redis::Pipeline {
    let writes: Vec<&TileWrite> = writes.into_iter().collect();
    let mut pipe = redis::pipe();
    for (i, chunk) in writes.chunks(TILE_ROWS_PER_CALL).enumerate() {
        let cmd = script
            .call(&mut pipe, with_source && i == 0)
            .arg(2 * chunk.len());
        for w in chunk {
            cmd.arg(&w.key);
        }
        for w in chunk {
            cmd.arg(event_ids_key(&w.key));
        }
        for w in chunk {
            cmd.arg(offset_field(&w.source))
                .arg(w.offset)
                .arg(event_time_field(&w.source))
                .arg(w.event_ts)
                .arg(w.expire_at.div_euclid(1000).max(1))
                .arg(w.delete.len())
                .arg(&w.delete)
                .arg(w.fields.len());
            for (name, v) in &w.fields {
                cmd.arg(name).arg(v.as_slice());
            }
            cmd.arg(w.ids_delete.len())
                .arg(&w.ids_delete)
                .arg(w.ids.len());
            for (name, v) in &w.ids {
                cmd.arg(name).arg(v.as_slice());
            }
        }
    }
    pipe
}

/// Per write, whether it applied; an answer of another length is a bug
/// that must not pass for "nothing applied".
pub(super) fn tile_outcomes(results: Vec<i64>, writes: usize) -> Result<Vec<bool>> {
    if results.len() != writes {
        return Err(Error::internal(format!(
            "the tile script answered {} results for {writes} row updates",
            results.len()
        )));
    }
    Ok(results.into_iter().map(|r| r == 1).collect())
}

/// The script of [`tile_pipeline`].
pub(super) fn tile_script() -> LuaScript {
    LuaScript::new(TILE_SCRIPT)
}

/// One run of [`WRITE_SCRIPT`] per row, by `EVALSHA` (`with_source`: the
/// first by `EVAL`, see [`LuaScript::call`]).
pub(super) fn write_pipeline<'a>(
    rows: impl IntoIterator<Item = &'a WriteRow>,
    script: &LuaScript,
    with_source: bool,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for (i, r) in rows.into_iter().enumerate() {
        let cmd = script
            .call(&mut pipe, with_source && i == 0)
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
pub(super) fn write_script() -> LuaScript {
    LuaScript::new(WRITE_SCRIPT)
}

/// A Lua script of the store: called by its SHA-1 (`EVALSHA`), loaded
/// with `SCRIPT LOAD` when a server does not have it. Sent whole (`EVAL`)
/// only where loading did not help: a user whose ACL refuses `SCRIPT LOAD`,
/// or a cluster node the load did not reach (one that serves slots by ASK
/// redirection while a slot migrates to it, or a primary promoted before
/// the client's slot map knows it). `EVAL` caches the script as a side
/// effect, so the pipeline's later calls, and later pipelines, find it.
pub(super) struct LuaScript {
    source: &'static str,
    sha1: String,
}

impl LuaScript {
    fn new(source: &'static str) -> LuaScript {
        LuaScript {
            source,
            sha1: Script::new(source).get_hash().to_owned(),
        }
    }

    /// Adds a call of the script to `pipe`: `EVALSHA <sha1>`, or
    /// `EVAL <source>` when `with_source`. The caller adds the key count,
    /// keys and arguments (`Pipeline::arg` extends the last command).
    /// A pipeline that must send the source does so in its first call
    /// only: Redis runs a pipeline's commands in order on one node, so
    /// that `EVAL` has cached the script for the `EVALSHA`s after it.
    fn call<'p>(
        &self,
        pipe: &'p mut redis::Pipeline,
        with_source: bool,
    ) -> &'p mut redis::Pipeline {
        if with_source {
            pipe.cmd("EVAL").arg(self.source)
        } else {
            pipe.cmd("EVALSHA").arg(self.sha1.as_str())
        }
    }

    /// `SCRIPT LOAD <source>`.
    pub(super) fn load_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.source);
        cmd
    }
}

/// Counts written (1) and stale (0) script results.
pub(super) fn outcome(results: &[i64]) -> WriteOutcome {
    let written = results.iter().filter(|&&r| r == 1).count() as u64;
    WriteOutcome {
        written,
        stale: results.len() as u64 - written,
        expired: 0,
    }
}

/// Settings of [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://...` for TLS
    /// (see [`RedisTls`]).
    pub url: String,
    /// Maximum pooled connections.
    pub pool_size: usize,
    /// Deadline of every call, including waiting for a pooled connection.
    pub timeout: Duration,
    /// Certificates of `rediss://` connections.
    pub tls: RedisTls,
}

/// Certificates of TLS connections to Redis and Redis Cluster
/// (`rediss://` URLs; rustls). Without `ca_file` the server's certificate
/// is checked against the system's trusted roots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisTls {
    /// PEM CA certificates that sign the Redis servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, when Redis requires one (`tls-auth-clients yes`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    /// Whether any certificate file is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// The files' contents as the redis client takes them.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming the file that cannot be read, or a client
    /// certificate without its key (or the reverse).
    pub fn certificates(&self) -> Result<redis::TlsCertificates> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                Error::invalid(format!(
                    "cannot read the redis TLS {what} {}: {e}",
                    path.display()
                ))
            })
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("client certificate", cert)?,
                client_key: read("client key", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::invalid(
                    "redis TLS: give both tls_cert_file and tls_key_file (a client certificate and its key), or neither",
                ))
            }
        };
        let root_cert = match &self.ca_file {
            Some(ca) => Some(read("CA file", ca)?),
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// A redis client for `url`: over TLS with `tls`'s certificates for
/// `rediss://` URLs.
///
/// # Errors
/// `INVALID_ARGUMENT` for a malformed URL (its password redacted),
/// unreadable certificate files, or certificate files given with a
/// `redis://` URL (they would be silently unused).
pub(super) fn client(url: &str, tls: &RedisTls) -> Result<redis::Client> {
    let invalid =
        |e: RedisError| Error::invalid(format!("invalid redis url ({}): {e}", redact(url)));
    if !is_tls_url(url) {
        if tls.is_set() {
            return Err(Error::invalid(format!(
                "redis TLS certificate files are set but the url ({}) is not rediss://; use rediss:// to connect over TLS",
                redact(url)
            )));
        }
        return redis::Client::open(url).map_err(invalid);
    }
    redis::Client::build_with_tls(url, tls.certificates()?).map_err(invalid)
}

/// Whether `url` asks for TLS (`rediss://`).
pub(super) fn is_tls_url(url: &str) -> bool {
    url.get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
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
    write_script: LuaScript,
    tile_script: LuaScript,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Redis's error as quiver's: UNAVAILABLE (retrying may help: the server
/// is unreachable, loading, failing over, out of memory, busy with a
/// script, out of client slots) or INTERNAL (retrying the same command
/// cannot help: a script error, a wrong type, a command rejected as
/// malformed, wrong credentials or ACL permissions). The ingest loop
/// retries the first kind and stops on the second.
pub(super) fn redis_error(e: RedisError) -> Error {
    use redis::ErrorKind as K;
    if is_connection_error(&e) {
        return Error::unavailable(format!("redis is unreachable: {e}"));
    }
    let permanent = match e.kind() {
        // A Lua runtime error fails the same way every time; other `ERR`
        // replies may be transient ("max number of clients reached").
        K::ResponseError => {
            let text = e.to_string();
            text.contains("user_script") || text.contains("Error running script")
        }
        K::TypeError
        | K::ExecAbortError
        | K::CrossSlot
        | K::ClientError
        | K::InvalidClientConfig
        | K::AuthenticationFailed => true,
        K::ExtensionError => matches!(e.code(), Some("WRONGTYPE" | "WRONGPASS" | "NOPERM")),
        _ => false,
    };
    if permanent {
        Error::internal(format!("redis rejected the operation: {e}"))
    } else {
        Error::unavailable(format!("redis refused the operation: {e}"))
    }
}

impl RedisStore {
    /// Creates the pool. Does not connect; connections open on first use,
    /// so a server that starts before Redis still comes up (not ready).
    pub fn new(cfg: &RedisConfig) -> Result<RedisStore> {
        let client = client(&cfg.url, &cfg.tls)?;
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
            tile_script: tile_script(),
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

impl RedisStore {
    /// Runs a pipeline of calls of `script`, built by `build(with_source)`.
    /// When Redis does not have the script (the first call after a
    /// restart, a failover or a `SCRIPT FLUSH`), it is loaded once with
    /// `SCRIPT LOAD` and the `EVALSHA` pipeline runs again; where that does
    /// not help, the pipeline's first call carries the source (`EVAL`), see
    /// [`LuaScript`]. Sending the source with every call would cost a large
    /// write megabytes (it missed the store deadline).
    ///
    /// A run again is safe: both scripts are idempotent. Usually nothing ran
    /// the first time, as every call named the missing script; if another
    /// client flushed scripts while the pipeline ran, its first calls did,
    /// and the tile script then reports those rows as already applied.
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &LuaScript,
        build: impl Fn(bool) -> redis::Pipeline,
    ) -> Result<Vec<T>> {
        with_deadline("redis", self.timeout, async {
            let mut conn = self.conn().await?;
            let pipe = build(false);
            let mut result = pipe.query_async(&mut *conn).await;
            if is_noscript(&result) {
                match script.load_cmd().query_async::<()>(&mut *conn).await {
                    Ok(()) => result = pipe.query_async(&mut *conn).await,
                    Err(e) if is_connection_error(&e) => result = Err(e),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "redis refused SCRIPT LOAD; sending the script's source instead (grant the user +script|load)"
                    ),
                }
                if is_noscript(&result) {
                    result = build(true).query_async(&mut *conn).await;
                }
            }
            if let Err(e) = &result {
                discard_if_broken(conn, e);
            }
            result.map_err(redis_error)
        })
        .await
    }
}

/// Whether `result` failed with Redis's `NOSCRIPT` (an `EVALSHA` of a
/// script the server does not have).
fn is_noscript<T>(result: &std::result::Result<T, RedisError>) -> bool {
    matches!(result, Err(e) if is_noscript_error(e))
}

/// Whether `e` is Redis's `NOSCRIPT`.
pub(super) fn is_noscript_error(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::NoScriptError
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        // Malformed (no scheme separator): everything before the last `@`
        // may be a password.
        (_, Some(at)) => format!("***@{}", &url[at + 1..]),
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
        parse_rows(replies, lookups.iter())
    }

    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome> {
        if rows.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let results: Vec<i64> = self
            .run_script(&self.write_script, |src| {
                write_pipeline(rows, &self.write_script, src)
            })
            .await?;
        Ok(outcome(&results))
    }

    async fn write_tiles(&self, writes: &[TileWrite]) -> Result<Vec<bool>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let results: Vec<Vec<i64>> = self
            .run_script(&self.tile_script, |src| {
                tile_pipeline(writes, &self.tile_script, src)
            })
            .await?;
        tile_outcomes(results.concat(), writes.len())
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
        // Malformed URLs too (they end up in validation errors).
        assert_eq!(redact("redis:/:hunter2@10.0.0.5:6379"), "***@10.0.0.5:6379");
        assert_eq!(redact(":pw@h"), "***@h");
    }
}
