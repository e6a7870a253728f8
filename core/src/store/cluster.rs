//! Redis Cluster online store: the same keys, values and scripts as
//! [`super::RedisStore`], spread over the cluster's nodes.
//!
//! A Redis Cluster pipeline must stay in one hash slot, and the key layout
//! puts every view of one entity in the slot of its hash tag. A call is
//! therefore split into one pipeline per slot (per entity), and the
//! pipelines run concurrently over the cluster client's multiplexed node
//! connections: one round trip of wall time per call, not one per entity.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{get_slot, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};

use super::redis::{
    is_noscript_error, is_tls_url, outcome, parse_rows, read_pipeline, redact, redis_error,
    tile_pipeline, tile_script, write_pipeline, write_script, LuaScript,
};
use super::{
    with_deadline, Lookup, OnlineStore, RedisTls, StoredRow, TileWrite, WriteOutcome, WriteRow,
};
use crate::error::{Error, Result};

/// Online store on a Redis Cluster, see the module docs.
pub struct RedisClusterStore {
    client: ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    timeout: Duration,
    write_script: LuaScript,
    tile_script: LuaScript,
}

impl std::fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Indices of `keys` grouped by hash slot, in slot order.
fn by_slot<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.enumerate() {
        groups.entry(get_slot(k.as_bytes())).or_default().push(i);
    }
    groups.into_values().collect()
}

impl RedisClusterStore {
    /// Creates the client from seed node URLs (all `redis://`, or all
    /// `rediss://` for TLS with `tls`'s certificates). Does not connect:
    /// the first call does, so a server that starts before the cluster
    /// still comes up (not ready).
    pub fn new(nodes: &[String], timeout: Duration, tls: &RedisTls) -> Result<RedisClusterStore> {
        if nodes.is_empty() {
            return Err(Error::invalid(
                "redis cluster: give at least one seed node URL",
            ));
        }
        let with_tls = nodes.iter().filter(|n| is_tls_url(n)).count();
        if with_tls != 0 && with_tls != nodes.len() {
            return Err(Error::invalid(
                "redis cluster: seed node URLs mix redis:// and rediss://; use rediss:// for all of them (TLS) or for none",
            ));
        }
        if with_tls == 0 && tls.is_set() {
            return Err(Error::invalid(
                "redis TLS certificate files are set but the cluster node URLs are not rediss://; use rediss:// to connect over TLS",
            ));
        }
        let mut builder = ClusterClient::builder(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if with_tls != 0 {
            builder = builder.certs(tls.certificates()?);
        }
        let client = builder.build().map_err(|e| {
            Error::invalid(format!(
                "invalid redis cluster configuration: {}",
                redact(&e.to_string())
            ))
        })?;
        Ok(RedisClusterStore {
            client,
            conn: tokio::sync::Mutex::new(None),
            timeout,
            write_script: write_script(),
            tile_script: tile_script(),
        })
    }

    /// The shared cluster connection, connecting on first use. The
    /// connection itself follows slot moves and reconnects to nodes.
    async fn conn(&self) -> Result<ClusterConnection> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = self
            .client
            .get_async_connection()
            .await
            .map_err(redis_error)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs a pipeline. The outer error is ours (no connection), the inner
    /// one Redis's, as in `RedisStore::pipeline`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<std::result::Result<T, redis::RedisError>> {
        let mut conn = self.conn().await?;
        Ok(pipe.query_async(&mut conn).await)
    }

    /// `SCRIPT LOAD` on every primary.
    async fn load_script(&self, script: &LuaScript) -> Result<()> {
        let mut conn = self.conn().await?;
        let all_primaries = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        ));
        conn.route_command(&script.load_cmd(), all_primaries)
            .await
            .map(drop)
            .map_err(redis_error)
    }
}

impl RedisClusterStore {
    /// Runs one pipeline of calls of `script` per slot group, built by
    /// `build(group, with_source)`, concurrently; returns the script
    /// results in input order. When nodes lack the script (new, restarted,
    /// failed over), it is loaded once on every primary (`SCRIPT LOAD`)
    /// and the groups that missed it run again, as in
    /// `RedisStore::run_script`: one load per node, however many slots the
    /// call spans. Groups that miss it still (a node the load did not
    /// reach, see [`LuaScript`]) are sent with the source.
    async fn run_scripts(
        &self,
        n: usize,
        groups: &[Vec<usize>],
        script: &LuaScript,
        build: impl Fn(&[usize], bool) -> redis::Pipeline,
    ) -> Result<Vec<i64>> {
        let build = &build;
        let run_groups = |todo: Vec<usize>, with_source: bool| {
            futures::future::try_join_all(todo.into_iter().map(move |g| async move {
                let replies: std::result::Result<Vec<redis::Value>, _> =
                    self.run(&build(&groups[g], with_source)).await?;
                Ok::<_, Error>((g, replies))
            }))
        };
        // Replies into `parts`; the groups that answered NOSCRIPT into `missed`.
        type Replies = std::result::Result<Vec<redis::Value>, redis::RedisError>;
        let sort = |done: Vec<(usize, Replies)>,
                    parts: &mut [Option<Vec<redis::Value>>],
                    missed: &mut Vec<usize>|
         -> Result<()> {
            for (g, replies) in done {
                match replies {
                    Ok(r) => parts[g] = Some(r),
                    Err(e) if is_noscript_error(&e) => missed.push(g),
                    Err(e) => return Err(redis_error(e)),
                }
            }
            Ok(())
        };
        let parts = with_deadline("redis cluster", self.timeout, async {
            let mut parts: Vec<Option<Vec<redis::Value>>> = vec![None; groups.len()];
            let mut missed = Vec::new();
            let all = (0..groups.len()).collect();
            sort(run_groups(all, false).await?, &mut parts, &mut missed)?;
            if !missed.is_empty() {
                if let Err(e) = self.load_script(script).await {
                    tracing::warn!(
                        error = %e,
                        "SCRIPT LOAD on the redis cluster's primaries failed; sending the script's source instead"
                    );
                }
                let again = std::mem::take(&mut missed);
                sort(run_groups(again, false).await?, &mut parts, &mut missed)?;
            }
            if !missed.is_empty() {
                for (g, replies) in run_groups(missed, true).await? {
                    parts[g] = Some(replies.map_err(redis_error)?);
                }
            }
            parts
                .into_iter()
                .map(|p| flatten_ints(p.unwrap_or_default()))
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let mut out = vec![0; n];
        for (idx, results) in groups.iter().zip(parts) {
            // Fewer answers than rows must not pass for "not applied".
            if results.len() != idx.len() {
                return Err(Error::internal(format!(
                    "a redis script answered {} results for {} rows",
                    results.len(),
                    idx.len()
                )));
            }
            for (&i, r) in idx.iter().zip(results) {
                out[i] = r;
            }
        }
        Ok(out)
    }
}

/// Script results as one integer per row: a script returns an integer (one
/// row) or an array of them (several rows).
fn flatten_ints(replies: Vec<redis::Value>) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(replies.len());
    for r in replies {
        match r {
            redis::Value::Int(n) => out.push(n),
            redis::Value::Array(items) => {
                for i in items {
                    match i {
                        redis::Value::Int(n) => out.push(n),
                        _ => return Err(Error::internal("unexpected script reply from redis")),
                    }
                }
            }
            _ => return Err(Error::internal("unexpected script reply from redis")),
        }
    }
    Ok(out)
}

#[async_trait]
impl OnlineStore for RedisClusterStore {
    fn backend(&self) -> &'static str {
        "redis_cluster"
    }

    async fn read(&self, lookups: &[Lookup<'_>]) -> Result<Vec<Option<StoredRow>>> {
        let groups = by_slot(lookups.iter().map(|l| l.key));
        let calls = groups.iter().map(|idx| {
            let pipe = read_pipeline(idx.iter().map(|&i| &lookups[i]));
            async move {
                let replies: Vec<redis::Value> = self.run(&pipe).await?.map_err(redis_error)?;
                parse_rows(replies, idx.iter().map(|&i| &lookups[i]))
            }
        });
        let parts = with_deadline(
            "redis cluster",
            self.timeout,
            futures::future::try_join_all(calls),
        )
        .await?;
        let mut out = vec![None; lookups.len()];
        for (idx, rows) in groups.iter().zip(parts) {
            for (&i, row) in idx.iter().zip(rows) {
                out[i] = row;
            }
        }
        Ok(out)
    }

    async fn write(&self, rows: &[WriteRow]) -> Result<WriteOutcome> {
        let groups = by_slot(rows.iter().map(|r| r.key.as_str()));
        let results = self
            .run_scripts(rows.len(), &groups, &self.write_script, |idx, src| {
                write_pipeline(idx.iter().map(|&i| &rows[i]), &self.write_script, src)
            })
            .await?;
        Ok(outcome(&results))
    }

    async fn write_tiles(&self, writes: &[TileWrite]) -> Result<Vec<bool>> {
        let groups = by_slot(writes.iter().map(|w| w.key.as_str()));
        let results = self
            .run_scripts(writes.len(), &groups, &self.tile_script, |idx, src| {
                tile_pipeline(idx.iter().map(|&i| &writes[i]), &self.tile_script, src)
            })
            .await?;
        Ok(results.into_iter().map(|r| r == 1).collect())
    }

    async fn ping(&self) -> Result<()> {
        with_deadline("redis cluster", self.timeout, async {
            let mut conn = self.conn().await?;
            // CLUSTER INFO on a random node: reachable and serving all slots.
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if info.contains("cluster_state:ok") {
                Ok(())
            } else {
                Err(Error::unavailable(
                    "redis cluster reports cluster_state:fail",
                ))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::by_slot;

    #[test]
    fn keys_of_one_entity_share_a_slot_group() {
        let keys = [
            "qv1:{user_id=a}:v1",
            "qv1:{user_id=b}:v1",
            "qv1:{user_id=a}:v2",
            "qv1:{user_id=b}:v2",
        ];
        let groups = by_slot(keys.iter().copied());
        assert_eq!(groups.len(), 2);
        for g in groups {
            assert_eq!(g.len(), 2);
            assert_eq!(keys[g[0]][..14], keys[g[1]][..14]);
        }
    }
}
