//! An envoyproxy/ratelimit instance as Redis sees it, for the migration
//! tests: a test client written from upstream's documented behaviour (not
//! a copy of its code). Per request descriptor with a limit it builds
//! upstream's key — `<CACHE_KEY_PREFIX><domain>_<key>_<value>_…_<window
//! start>`, the window start in Unix seconds floored to the unit — sends
//! `INCRBY key hits` then `EXPIRE key unit + jitter` (jitter in `[0, max)`
//! seconds), pipelined, and decides from the `INCRBY` reply: over the limit
//! when the count after it passed the limit. On one Redis a request is one
//! pipeline; on a cluster each key's pair goes to the master of the key's
//! slot (nothing is hash-tagged), one key after the other, as upstream's
//! default cluster mode sends them.

use std::collections::HashMap;

use redis::aio::MultiplexedConnection;

/// An emulated upstream instance.
#[derive(Clone)]
pub struct Upstream {
    prefix: String,
    jitter_max_seconds: u64,
    redis: Redis,
}

#[derive(Clone)]
enum Redis {
    Single(MultiplexedConnection),
    Cluster {
        /// Per slot, the port of its master.
        masters: Vec<u16>,
        nodes: HashMap<u16, MultiplexedConnection>,
    },
}

/// A limit as upstream's YAML gives it.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub requests_per_unit: u64,
    pub unit_seconds: u64,
}

/// One descriptor's answer, as upstream computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub over_limit: bool,
    pub limit_remaining: u64,
    pub duration_until_reset: u64,
}

impl Upstream {
    /// An instance on the Redis at `url` (no prefix, no jitter).
    pub async fn on(url: &str) -> Self {
        Self {
            prefix: String::new(),
            jitter_max_seconds: 0,
            redis: Redis::Single(connect(url).await),
        }
    }

    /// An instance on the Redis Cluster whose nodes listen on `ports`.
    pub async fn on_cluster(ports: &[u16]) -> Self {
        let mut nodes = HashMap::new();
        for port in ports {
            nodes.insert(*port, connect(&format!("redis://127.0.0.1:{port}")).await);
        }
        let mut any = nodes.values().next().unwrap().clone();
        let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<Vec<redis::Value>>>(&mut any)
            .await
            .unwrap()
            .into_iter()
            .map(|range| {
                let start: u16 = redis::from_redis_value_ref(&range[0]).unwrap();
                let end: u16 = redis::from_redis_value_ref(&range[1]).unwrap();
                let master: Vec<redis::Value> = redis::from_redis_value_ref(&range[2]).unwrap();
                let host: String = redis::from_redis_value_ref(&master[0]).unwrap();
                let port: u16 = redis::from_redis_value_ref(&master[1]).unwrap();
                (start, end, (host, port))
            })
            .collect();
        let mut masters = vec![0; 16_384];
        for (start, end, (_, port)) in ranges {
            for slot in start..=end {
                masters[usize::from(slot)] = port;
            }
        }
        assert!(masters.iter().all(|p| *p != 0), "every slot has a master");
        Self {
            prefix: String::new(),
            jitter_max_seconds: 0,
            redis: Redis::Cluster { masters, nodes },
        }
    }

    /// Upstream's `CACHE_KEY_PREFIX`.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    /// Upstream's `EXPIRATION_JITTER_MAX_SECONDS`.
    pub fn with_jitter(mut self, max_seconds: u64) -> Self {
        self.jitter_max_seconds = max_seconds;
        self
    }

    /// Upstream's key for `entries` of `domain` in the window of
    /// `unit_seconds` holding `now_seconds`.
    pub fn key(
        &self,
        domain: &str,
        entries: &[(&str, &str)],
        unit_seconds: u64,
        now_seconds: u64,
    ) -> String {
        let mut key = format!("{}{domain}_", self.prefix);
        for (k, v) in entries {
            key.push_str(&format!("{k}_{v}_"));
        }
        key.push_str(&(now_seconds / unit_seconds * unit_seconds).to_string());
        key
    }

    /// One `ShouldRateLimit` as upstream handles it: every descriptor
    /// counted with `hits`, judged from its `INCRBY` reply.
    pub async fn should_rate_limit(
        &self,
        domain: &str,
        descriptors: &[(&[(&str, &str)], Limit)],
        hits: u64,
        now_seconds: u64,
    ) -> Vec<Status> {
        let keys: Vec<(String, Limit)> = descriptors
            .iter()
            .map(|(entries, limit)| {
                (
                    self.key(domain, entries, limit.unit_seconds, now_seconds),
                    *limit,
                )
            })
            .collect();
        let afters: Vec<u64> = match &self.redis {
            Redis::Single(conn) => {
                let mut pipe = redis::pipe();
                for (key, limit) in &keys {
                    pipe.cmd("INCRBY").arg(key).arg(hits);
                    pipe.cmd("EXPIRE")
                        .arg(key)
                        .arg(limit.unit_seconds + self.jitter())
                        .ignore();
                }
                pipe.query_async(&mut conn.clone()).await.unwrap()
            }
            Redis::Cluster { masters, nodes } => {
                let mut afters = Vec::new();
                for (key, limit) in &keys {
                    let port = masters[usize::from(slot(key.as_bytes()))];
                    let (after,): (u64,) = redis::pipe()
                        .cmd("INCRBY")
                        .arg(key)
                        .arg(hits)
                        .cmd("EXPIRE")
                        .arg(key)
                        .arg(limit.unit_seconds + self.jitter())
                        .ignore()
                        .query_async(&mut nodes[&port].clone())
                        .await
                        .unwrap();
                    afters.push(after);
                }
                afters
            }
        };
        keys.iter()
            .zip(afters)
            .map(|((_, limit), after)| {
                let over_limit = after > limit.requests_per_unit;
                Status {
                    over_limit,
                    limit_remaining: if over_limit {
                        0
                    } else {
                        limit.requests_per_unit - after
                    },
                    duration_until_reset: limit.unit_seconds - now_seconds % limit.unit_seconds,
                }
            })
            .collect()
    }

    /// The count in `key`, read where upstream would read it.
    pub async fn get(&self, key: &str) -> Option<u64> {
        let mut conn = match &self.redis {
            Redis::Single(conn) => conn.clone(),
            Redis::Cluster { masters, nodes } => {
                nodes[&masters[usize::from(slot(key.as_bytes()))]].clone()
            }
        };
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    fn jitter(&self) -> u64 {
        match self.jitter_max_seconds {
            0 => 0,
            max => fastrand::u64(0..max),
        }
    }
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The hash slot Redis Cluster puts `key` on: CRC16 (XMODEM) of its hash
/// tag (between the first `{` and the next `}`, when not empty) or of the
/// whole key, modulo 16,384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let crc = tagged.iter().fold(0u16, |mut crc, &byte| {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
        crc
    });
    crc % 16_384
}
