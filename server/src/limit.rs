//! Per-caller concurrency limits: one caller (an API key, or a client
//! address when authentication is off) cannot hold more than
//! `limits.max_in_flight_per_key` requests at once, so a runaway client
//! gets `RESOURCE_EXHAUSTED` / 429 instead of starving the others of the
//! online store's connections. Counted in the layer in front of both APIs
//! ([`crate::auth::AuthLayer`]), so gRPC and REST requests of one caller
//! share one count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Whose requests are counted together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerId {
    /// An API key, by its name.
    Key(String),
    /// An unauthenticated client, by its address.
    Peer(IpAddr),
    /// Requests without a known peer (in-process calls).
    Local,
}

impl std::fmt::Display for CallerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallerId::Key(name) => match name.strip_prefix("jwt:") {
                Some(sub) => write!(f, "token of {}", quiver_core::error::quote(sub)),
                None => write!(f, "API key {}", quiver_core::error::quote(name)),
            },
            CallerId::Peer(ip) => write!(f, "client {ip}"),
            CallerId::Local => f.write_str("in-process caller"),
        }
    }
}

/// The in-flight requests of every caller that has any.
#[derive(Debug, Default)]
pub struct InFlight {
    counts: Mutex<HashMap<CallerId, usize>>,
}

/// One admitted request; its caller's count goes down when dropped.
#[derive(Debug)]
pub struct Permit {
    owner: Arc<InFlight>,
    id: CallerId,
}

impl InFlight {
    /// Admits one more request of `id` unless it already has `max` in
    /// flight; `None` means refuse.
    pub fn try_acquire(self: &Arc<Self>, id: CallerId, max: usize) -> Option<Permit> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(id.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                counts.remove(&id);
            }
            return None;
        }
        *n += 1;
        Some(Permit {
            owner: self.clone(),
            id,
        })
    }

    /// Requests of `id` in flight now.
    pub fn count(&self, id: &CallerId) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(id).copied().unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_limited_separately_and_released_on_drop() {
        let f = Arc::new(InFlight::default());
        let a = CallerId::Key("a".into());
        let b = CallerId::Peer([10, 0, 0, 1].into());
        let p1 = f.try_acquire(a.clone(), 2).unwrap();
        let p2 = f.try_acquire(a.clone(), 2).unwrap();
        assert!(f.try_acquire(a.clone(), 2).is_none());
        let q = f.try_acquire(b.clone(), 2).unwrap();
        assert_eq!((f.count(&a), f.count(&b)), (2, 1));
        drop(p1);
        let p3 = f.try_acquire(a.clone(), 2).unwrap();
        drop((p2, p3, q));
        assert!(f.counts.lock().unwrap().is_empty());
        assert!(f.try_acquire(a.clone(), 0).is_none());
        assert!(f.counts.lock().unwrap().is_empty());
    }
}
