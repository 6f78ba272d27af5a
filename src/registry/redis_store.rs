//! The Redis store (`state: {kind: redis}`), for a fleet of replicas: one hash per session
//! under `key_prefix`, every decision an atomic Lua script (insert-if-absent, compare-and-set
//! on the epoch), moves and deletes announced on a pub/sub channel so the other replicas'
//! caches follow (`redis_store/follow.rs`). The connection (`redis_conn`: one URL through the `redis` crate's
//! connection manager, or the master the Redis Sentinels name) is made on first use, so the
//! proxy starts while Redis is down.

mod follow;

use super::redis_conn::{Conn, Target, TargetError};
use super::{Created, Moved, Record, Store, StoreError};
use crate::config::StateConfig;
use redis::{AsyncCommands, Script};
use std::time::Duration;

/// Sessions per sync script call (one round trip each).
const SYNC_BATCH: usize = 256;

const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'o', ARGV[1], 'b', ARGV[2], 'e', ARGV[3], 'c', ARGV[4], 'u', ARGV[5])
return {}
";

const MOVE: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then return {} end
local moved = '0'
if e == ARGV[1] then
  redis.call('HSET', KEYS[1], 'b', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'e', 1)
  moved = '1'
end
local r = redis.call('HGETALL', KEYS[1])
table.insert(r, 1, moved)
return r
";

const REMOVE: &str = r"
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
";

/// ARGV: owner, backend, epoch, created of the record a create wrote.
const UNDO: &str = r"
local r = redis.call('HMGET', KEYS[1], 'o', 'b', 'e', 'c')
if r[1] == ARGV[1] and r[2] == ARGV[2] and r[3] == ARGV[3] and r[4] == ARGV[4] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The hygiene reaper's compare-and-set delete: only the record exactly as it was read.
/// ARGV: owner, backend, epoch, created, last used.
const REMOVE_EXACT: &str = r"
local r = redis.call('HMGET', KEYS[1], 'o', 'b', 'e', 'c', 'u')
if r[1] == ARGV[1] and r[2] == ARGV[2] and r[3] == ARGV[3] and r[4] == ARGV[4] and r[5] == ARGV[5] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Renews the hygiene lease if ARGV[1] holds it (compare-and-set on the holder, so a
/// replica whose lease expired and was taken never extends the new holder's); returns the
/// holder, or nil when nobody holds it.
const RENEW_LEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return cur
";

/// Deletes the hygiene lease only if ARGV[1] holds it.
const RELEASE_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// KEYS: the sessions; ARGV: five values per session (owner, backend, epoch, created,
/// used). Returns, flattened, `index, HGETALL...` for each record that differs.
const SYNC: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local a = (i - 1) * 5
  local o, b, e, c, u = ARGV[a+1], ARGV[a+2], ARGV[a+3], ARGV[a+4], ARGV[a+5]
  if redis.call('EXISTS', k) == 0 then
    redis.call('HSET', k, 'o', o, 'b', b, 'e', e, 'c', c, 'u', u)
  else
    local cur = redis.call('HMGET', k, 'o', 'b', 'e', 'u')
    if tonumber(u) > tonumber(cur[4] or '0') then redis.call('HSET', k, 'u', u) end
    if cur[1] ~= o or cur[2] ~= b or cur[3] ~= e then
      table.insert(out, tostring(i))
      local r = redis.call('HGETALL', k)
      table.insert(out, tostring(#r))
      for _, x in ipairs(r) do table.insert(out, x) end
    end
  end
end
return out
";

/// KEYS: the replicas' sorted set (score: expiry), this replica's counts hash. ARGV: now ms,
/// ttl ms, this replica's id, the prefix of every replica's counts hash, then field/value
/// pairs (`t:<tenant>`, `b:<backend>`). Returns every other live replica's pairs, flattened.
const SHARE_LIVE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
redis.call('DEL', KEYS[2])
if #ARGV > 4 then
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i+1]) end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id ~= ARGV[3] then
    for _, x in ipairs(redis.call('HGETALL', ARGV[4] .. id)) do table.insert(out, x) end
  end
end
return out
";

/// Session records in Redis.
pub(crate) struct RedisStore {
    target: Target,
    prefix: String,
    timeout: Duration,
    create: Script,
    moves: Script,
    remove: Script,
    sync: Script,
    share: Script,
    undo: Script,
    remove_exact: Script,
    renew: Script,
    release: Script,
}

fn parse_record(id: &str, flat: &[String]) -> Result<Option<Record>, StoreError> {
    if flat.is_empty() {
        return Ok(None);
    }
    let corrupt = |why| StoreError::Corrupt {
        id: id.to_string(),
        why,
    };
    let (mut o, mut b, mut e, mut c, mut u) = (None, None, None, None, None);
    for kv in flat.chunks(2) {
        let [k, v] = kv else {
            return Err(corrupt("odd field list"));
        };
        match k.as_str() {
            "o" => o = Some(v.clone()),
            "b" => b = Some(v.clone()),
            "e" => e = v.parse().ok(),
            "c" => c = v.parse().ok(),
            "u" => u = v.parse().ok(),
            _ => {}
        }
    }
    match (o, b, e) {
        (Some(owner), Some(backend), Some(epoch)) => Ok(Some(Record {
            owner,
            backend,
            epoch,
            created_ms: c.unwrap_or(0),
            last_used_ms: u.unwrap_or(0),
        })),
        _ => Err(corrupt("owner, backend or epoch missing")),
    }
}

impl RedisStore {
    /// Builds the client from `state` (URL or sentinels, passwords from env or file);
    /// connects on first use.
    pub(crate) fn new(cfg: &StateConfig) -> Result<RedisStore, TargetError> {
        let target = Target::new(cfg)?;
        Ok(RedisStore {
            target,
            prefix: cfg.key_prefix().to_string(),
            timeout: cfg.timeout(),
            create: Script::new(CREATE),
            moves: Script::new(MOVE),
            remove: Script::new(REMOVE),
            sync: Script::new(SYNC),
            share: Script::new(SHARE_LIVE),
            undo: Script::new(UNDO),
            remove_exact: Script::new(REMOVE_EXACT),
            renew: Script::new(RENEW_LEASE),
            release: Script::new(RELEASE_LEASE),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}s:{id}", self.prefix)
    }

    /// The SCAN pattern of every session key: the prefix with its glob characters escaped
    /// (a prefix is the operator's, and may hold any of them).
    fn session_pattern(&self) -> String {
        let mut p = String::new();
        for ch in format!("{}s:", self.prefix).chars() {
            if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(ch);
        }
        p.push('*');
        p
    }

    fn lease_key(&self) -> String {
        format!("{}hygiene:lease", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The shared connection, made on first use (and again after a failed attempt; with
    /// Sentinel, after the master it reached failed).
    async fn conn(&self) -> Result<Conn, StoreError> {
        Ok(self.target.conn(self.timeout).await?)
    }
}

/// A record's owner, backend, epoch and creation time: the fields the compare-and-set
/// scripts match on, in their argument order.
fn record_args(rec: &Record) -> (&str, &str, u64, u64) {
    (&rec.owner, &rec.backend, rec.epoch, rec.created_ms)
}

impl Store for RedisStore {
    async fn remove_exact(&self, id: &str, rec: &Record) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = self
            .remove_exact
            .key(self.key(id))
            .arg(record_args(rec))
            .arg(rec.last_used_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    async fn scan(&self, from: Option<&str>, count: usize) -> Result<super::Page, StoreError> {
        let mut c = self.conn().await?;
        let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(from.unwrap_or("0"))
            .arg("MATCH")
            .arg(self.session_pattern())
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut c)
            .await?;
        let strip = format!("{}s:", self.prefix);
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hgetall(k);
        }
        let all: Vec<Vec<String>> = if keys.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut c).await?
        };
        let mut page = super::Page {
            records: Vec::with_capacity(keys.len()),
            next: (next != "0").then_some(next),
        };
        for (k, flat) in keys.iter().zip(all) {
            let Some(id) = k.strip_prefix(&strip) else {
                continue;
            };
            // Deleted between SCAN and HGETALL: nothing to reap. A malformed record is left
            // for an operator (the proxy refuses its session as unknown anyway).
            if let Ok(Some(r)) = parse_record(id, &flat) {
                page.records.push((id.to_string(), r));
            }
        }
        Ok(page)
    }

    async fn lease(&self, me: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let mut c = self.conn().await?;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let set: Option<String> = redis::cmd("SET")
            .arg(self.lease_key())
            .arg(me)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut c)
            .await?;
        if set.is_some() {
            return Ok(Some(me.to_string()));
        }
        let holder: Option<String> = self
            .renew
            .key(self.lease_key())
            .arg(me)
            .arg(ttl_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(holder)
    }

    async fn release(&self, me: &str) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let _: i64 = self
            .release
            .key(self.lease_key())
            .arg(me)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    async fn undo_create(&self, id: &str, rec: &Record) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = self
            .undo
            .key(self.key(id))
            .arg(record_args(rec))
            .invoke_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    async fn share_live(
        &self,
        me: &str,
        mine: &super::LiveCounts,
        ttl: Duration,
    ) -> Result<super::LiveCounts, StoreError> {
        let mut c = self.conn().await?;
        let live = format!("{}live:", self.prefix);
        let mut inv = self.share.prepare_invoke();
        inv.key(format!("{}replicas", self.prefix))
            .key(format!("{live}{me}"))
            .arg(super::now_ms())
            .arg(ttl.as_millis() as u64)
            .arg(me)
            .arg(&live);
        for (t, n) in &mine.tenants {
            inv.arg(format!("t:{t}")).arg(*n);
        }
        for (b, n) in &mine.backends {
            inv.arg(format!("b:{b}")).arg(*n);
        }
        let flat: Vec<String> = inv.invoke_async(&mut c).await?;
        let mut others = super::LiveCounts::default();
        for kv in flat.chunks(2) {
            let [k, v] = kv else { break };
            let n: u64 = v.parse().unwrap_or(0);
            if let Some(t) = k.strip_prefix("t:") {
                *others.tenants.entry(t.to_string()).or_default() += n;
            } else if let Some(b) = k.strip_prefix("b:") {
                *others.backends.entry(b.to_string()).or_default() += n;
            }
        }
        Ok(others)
    }

    async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let mut c = self.conn().await?;
        let flat: Vec<String> = c.hgetall(self.key(id)).await?;
        parse_record(id, &flat)
    }

    async fn create(&self, id: &str, rec: &Record) -> Result<Created, StoreError> {
        let mut c = self.conn().await?;
        let flat: Vec<String> = self
            .create
            .key(self.key(id))
            .arg(record_args(rec))
            .arg(rec.last_used_ms)
            .invoke_async(&mut c)
            .await?;
        Ok(match parse_record(id, &flat)? {
            None => Created::Inserted,
            Some(r) => Created::Exists(r),
        })
    }

    async fn move_to(&self, id: &str, epoch: u64, backend: &str) -> Result<Moved, StoreError> {
        let mut c = self.conn().await?;
        let flat: Vec<String> = self
            .moves
            .key(self.key(id))
            .arg(epoch)
            .arg(backend)
            .invoke_async(&mut c)
            .await?;
        let Some((moved, rest)) = flat.split_first() else {
            return Ok(Moved::Stale(None));
        };
        let r = parse_record(id, rest)?;
        Ok(match (moved.as_str(), r) {
            ("1", Some(r)) => Moved::Done(r),
            (_, r) => Moved::Stale(r),
        })
    }

    async fn remove(&self, id: &str, epoch: Option<u64>) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let want = epoch.map(|e| e.to_string()).unwrap_or_default();
        let n: i64 = self
            .remove
            .key(self.key(id))
            .arg(want)
            .invoke_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    async fn sync(&self, held: &[(String, Record)]) -> Result<Vec<(String, Record)>, StoreError> {
        let mut c = self.conn().await?;
        let mut differs = Vec::new();
        for batch in held.chunks(SYNC_BATCH) {
            let mut inv = self.sync.prepare_invoke();
            for (id, r) in batch {
                inv.key(self.key(id))
                    .arg(&r.owner)
                    .arg(&r.backend)
                    .arg(r.epoch)
                    .arg(r.created_ms)
                    .arg(r.last_used_ms);
            }
            let flat: Vec<String> = inv.invoke_async(&mut c).await?;
            let mut it = flat.iter();
            while let (Some(i), Some(n)) = (it.next(), it.next()) {
                let (Ok(i), Ok(n)) = (i.parse::<usize>(), n.parse::<usize>()) else {
                    break;
                };
                let fields: Vec<String> = it.by_ref().take(n).cloned().collect();
                let Some((id, _)) = batch.get(i.wrapping_sub(1)) else {
                    continue;
                };
                if let Some(r) = parse_record(id, &fields)? {
                    differs.push((id.clone(), r));
                }
            }
        }
        Ok(differs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_from_hash_fields_and_refuse_missing_ones() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let r = parse_record(
            "s",
            &f(&["o", "a", "b", "b1", "e", "3", "c", "10", "u", "20"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.owner.as_str(), r.backend.as_str(), r.epoch),
            ("a", "b1", 3)
        );
        assert_eq!(parse_record("s", &[]).unwrap(), None);
        assert!(parse_record("s", &f(&["o", "a", "e", "1"])).is_err());
        assert!(parse_record("s", &f(&["o"])).is_err());
    }
}
