//! Sample events standing in for a shop's microservices: users log in,
//! browse product pages in sessions, add to cart and buy. Deterministic for
//! a seed and start (same seed and start, same events, same ids and times), so tests and
//! benchmarks can recompute what the pipeline must produce.
//!
//! Activity is skewed like real traffic: a few users and products account
//! for most events (a power-law pick). Event times advance by `time_step`
//! per event from `start`, so a run covers a known span of event time
//! whatever the wall-clock rate.

use quiver_core::event::Event;
use quiver_core::registry::Registry;
use quiver_core::time::Micros;
use quiver_core::{Error, Result, Value, ValueType};

/// SplitMix64: tiny, fast, and stable across versions (unlike `rand`'s
/// `StdRng`), which deterministic sample data needs.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// One of `xs`, uniformly.
    pub fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
    /// Skewed pick in [0, n): index ~ n * u^2 favours low indices.
    fn skewed(&mut self, n: u64) -> u64 {
        let u = self.f64();
        ((u * u) * n as f64) as u64 % n.max(1)
    }
}

const DEVICES: [&str; 4] = ["ios", "android", "web", "tablet"];
const COUNTRIES: [&str; 6] = ["NL", "DE", "US", "FR", "GB", "JP"];
const CATEGORIES: [&str; 8] = [
    "electronics",
    "books",
    "fashion",
    "home",
    "sports",
    "toys",
    "beauty",
    "grocery",
];

/// Settings of [`Generator`].
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Seed; the same seed gives the same events.
    pub seed: u64,
    /// Number of users (`user_0` ...).
    pub users: u64,
    /// Number of products (`product_0` ...).
    pub products: u64,
    /// Event time of the first event.
    pub start: Micros,
    /// Event-time distance between consecutive events.
    pub time_step: Micros,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            users: 5_000,
            products: 1_000,
            start: 0,
            time_step: 10_000,
        }
    }
}

/// Emits events of the sample registry's types: `login`, `page_view`,
/// `add_to_cart`, `purchase`.
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: GeneratorConfig,
    rng: Rng,
    seq: u64,
    now: Micros,
    session: Option<Session>,
}

#[derive(Debug, Clone)]
struct Session {
    id: String,
    user: u64,
    views_left: u32,
    /// Product shown last; carts and purchases refer to it.
    product: u64,
    in_cart: Option<(u64, i64)>,
}

/// Attributes each generated event type needs, with types.
const NEEDS: [(&str, &[(&str, ValueType)]); 4] = [
    (
        "login",
        &[
            ("device", ValueType::String),
            ("country", ValueType::String),
        ],
    ),
    (
        "page_view",
        &[
            ("session_id", ValueType::String),
            ("category", ValueType::String),
        ],
    ),
    (
        "add_to_cart",
        &[
            ("session_id", ValueType::String),
            ("quantity", ValueType::Int64),
            ("price", ValueType::Double),
        ],
    ),
    (
        "purchase",
        &[
            ("session_id", ValueType::String),
            ("quantity", ValueType::Int64),
            ("price", ValueType::Double),
            ("amount", ValueType::Double),
            ("category", ValueType::String),
        ],
    ),
];

impl Generator {
    /// A generator; fails if `registry` lacks the event types it emits (the
    /// sample registry, `registry/features.toml`, has them).
    pub fn new(cfg: GeneratorConfig, registry: &Registry) -> Result<Generator> {
        for (name, attrs) in NEEDS {
            let et = registry.event_type(name).ok_or_else(|| {
                Error::invalid(format!(
                    "the generator emits {name:?} events, which the registry does not declare; use registry/features.toml or declare it like there"
                ))
            })?;
            for (a, t) in attrs {
                if et.attribute(a) != Some(*t) {
                    return Err(Error::invalid(format!(
                        "the generator sets attribute {a:?} ({t}) on {name:?} events; the registry's event type must declare it so"
                    )));
                }
            }
        }
        if cfg.users == 0 || cfg.products == 0 {
            return Err(Error::invalid(
                "the generator needs at least one user and one product",
            ));
        }
        Ok(Generator {
            rng: Rng(cfg.seed),
            now: cfg.start,
            cfg,
            seq: 0,
            session: None,
        })
    }

    /// Number of events emitted so far.
    pub fn emitted(&self) -> u64 {
        self.seq
    }

    /// The next `n` events.
    pub fn batch(&mut self, n: usize) -> Vec<Event> {
        (0..n).map(|_| self.next_event()).collect()
    }

    fn price(&self, product: u64) -> f64 {
        // A fixed catalogue price per product, 2.00 to 501.99.
        let mut r = Rng(self.cfg.seed ^ product.wrapping_mul(0x2545_f491_4f6c_dd1d));
        2.0 + (r.below(50_000) as f64) / 100.0
    }

    fn user_profile(&self, user: u64) -> (&'static str, &'static str) {
        let mut r = Rng(self.cfg.seed ^ user.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1);
        (
            DEVICES[r.below(DEVICES.len() as u64) as usize],
            COUNTRIES[r.below(COUNTRIES.len() as u64) as usize],
        )
    }

    fn event(
        &mut self,
        event_type: &str,
        user: u64,
        product: Option<u64>,
        attrs: Vec<(&str, Value)>,
    ) -> Event {
        let mut entities = vec![("user_id".to_owned(), Value::String(format!("user_{user}")))];
        if let Some(p) = product {
            entities.push((
                "product_id".to_owned(),
                Value::String(format!("product_{p}")),
            ));
        }
        let ev = Event {
            // The start in the id: a second run (same seed, later start)
            // makes other events, not retries of the first run's, which
            // aggregates would count once (see `quiver_core::aggregate`).
            event_id: format!("{:x}-{:x}-{}", self.cfg.seed, self.cfg.start, self.seq),
            event_type: event_type.to_owned(),
            entities,
            event_time: self.now,
            attributes: attrs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        self.seq += 1;
        // Jitter of +-50% keeps times realistic yet strictly increasing.
        let step = self.cfg.time_step.max(2);
        self.now += step / 2 + self.rng.below(step as u64) as i64;
        ev
    }

    fn next_event(&mut self) -> Event {
        let Some(mut s) = self.session.take() else {
            let user = self.rng.skewed(self.cfg.users);
            let (device, country) = self.user_profile(user);
            let views = 2 + self.rng.below(12) as u32;
            self.session = Some(Session {
                id: format!("s{:x}-{}", self.cfg.seed, self.seq),
                user,
                views_left: views,
                product: 0,
                in_cart: None,
            });
            return self.event(
                "login",
                user,
                None,
                vec![
                    ("device", Value::String(device.into())),
                    ("country", Value::String(country.into())),
                ],
            );
        };
        let sid = Value::String(s.id.clone());
        // A cart item is bought with probability 0.3 right after being added.
        if let Some((p, qty)) = s.in_cart.take() {
            if self.rng.f64() < 0.3 {
                let price = self.price(p);
                let category = CATEGORIES[(p % CATEGORIES.len() as u64) as usize];
                let ev = self.event(
                    "purchase",
                    s.user,
                    Some(p),
                    vec![
                        ("session_id", sid),
                        ("quantity", Value::Int64(qty)),
                        ("price", Value::Double(price)),
                        (
                            "amount",
                            Value::Double((price * qty as f64 * 100.0).round() / 100.0),
                        ),
                        ("category", Value::String(category.into())),
                    ],
                );
                self.keep(s);
                return ev;
            }
        }
        if s.views_left > 0 && (s.views_left == 1 || self.rng.f64() < 0.8) {
            s.views_left -= 1;
            s.product = self.rng.skewed(self.cfg.products);
            let p = s.product;
            let category = CATEGORIES[(p % CATEGORIES.len() as u64) as usize];
            let dwell = (self.rng.f64() * 120.0 * 10.0).round() / 10.0;
            let ev = self.event(
                "page_view",
                s.user,
                Some(p),
                vec![
                    ("session_id", sid),
                    ("category", Value::String(category.into())),
                    ("dwell_seconds", Value::Double(dwell)),
                ],
            );
            self.keep(s);
            return ev;
        }
        // Add the last viewed product to the cart (or end the session).
        if s.views_left == 0 {
            self.session = None;
            return self.next_event();
        }
        let qty = 1 + self.rng.below(3) as i64;
        let p = s.product;
        s.in_cart = Some((p, qty));
        let ev = self.event(
            "add_to_cart",
            s.user,
            Some(p),
            vec![
                ("session_id", sid),
                ("quantity", Value::Int64(qty)),
                ("price", Value::Double(self.price(p))),
            ],
        );
        self.keep(s);
        ev
    }

    fn keep(&mut self, s: Session) {
        self.session = Some(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../registry/features.toml");
        Registry::load(&path).unwrap()
    }

    #[test]
    fn same_seed_same_events_and_all_valid() {
        let reg = registry();
        let cfg = GeneratorConfig {
            start: 1_700_000_000_000_000,
            ..GeneratorConfig::default()
        };
        let a = Generator::new(cfg.clone(), &reg).unwrap().batch(5_000);
        let b = Generator::new(cfg, &reg).unwrap().batch(5_000);
        assert_eq!(a, b);
        let mut counts = std::collections::BTreeMap::new();
        for e in &a {
            quiver_core::event::validate(&reg, e).unwrap();
            *counts.entry(e.event_type.as_str()).or_insert(0) += 1;
        }
        for t in ["login", "page_view", "add_to_cart", "purchase"] {
            assert!(counts.get(t).copied().unwrap_or(0) > 20, "{counts:?}");
        }
        assert!(a.windows(2).all(|w| w[0].event_time < w[1].event_time));
    }
}
