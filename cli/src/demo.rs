//! Sample features for the bundled registry: realistic, deterministic for
//! a seed, written through the same validated write path as `WriteFeatures`.

use quiver_core::time::Micros;
use quiver_core::Value;
use quiver_ingest::generate::Rng;
use quiver_server::auth::Principal;
use quiver_server::service::FeatureRowIn;
use quiver_server::FeatureServer;

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const COUNTRIES: &[&str] = &["US", "DE", "NL", "GB", "FR", "IN", "BR", "JP", "CA", "ES"];
const CATEGORIES: &[&str] = &[
    "electronics",
    "books",
    "home",
    "fashion",
    "sports",
    "toys",
    "beauty",
    "grocery",
];

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn row(key: (&str, String), ts: Micros, features: Vec<(&str, Value)>) -> FeatureRowIn {
    FeatureRowIn {
        entity_key: vec![(key.0.to_owned(), Value::String(key.1))],
        event_ts: Some(ts),
        features: features
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect(),
    }
}

/// What [`seed`] wrote.
#[derive(Debug, Default)]
pub struct Seeded {
    /// Rows stored.
    pub rows: u64,
}

/// Writes sample rows for `users` users and `products` products, with event
/// times in the hours before `now`.
pub async fn seed(
    svc: &FeatureServer,
    users: u64,
    products: u64,
    seed: u64,
    now: Micros,
) -> anyhow::Result<Seeded> {
    let mut rng = Rng(seed);
    let mut out = Seeded::default();
    let batch = 1000usize;
    let mut profile = Vec::with_capacity(batch);
    let mut activity = Vec::with_capacity(batch);
    let mut embedding = Vec::with_capacity(batch);
    for u in 1..=users {
        let id = format!("user_{u}");
        let recent = now - rng.below(6 * HOUR as u64) as i64;
        let premium = rng.below(5) == 0;
        profile.push(row(
            ("user_id", id.clone()),
            now - (30 + rng.below(300) as i64) * DAY,
            vec![
                ("age", Value::Int64(18 + rng.below(60) as i64)),
                ("country", Value::String(rng.pick(COUNTRIES).to_owned())),
                ("is_premium", Value::Bool(premium)),
                (
                    "signup_ts",
                    Value::Timestamp(now - (30 + rng.below(1500) as i64) * DAY),
                ),
            ],
        ));
        let sessions = 1 + rng.below(if premium { 40 } else { 15 }) as i64;
        let page_views = sessions * (2 + rng.below(12) as i64);
        let carts = rng.below(page_views as u64 / 3 + 1) as i64;
        let purchases = rng.below(carts as u64 + 1) as i64;
        let aov = round2(15.0 + rng.f64() * if premium { 220.0 } else { 90.0 });
        let mut favs: Vec<String> = (0..1 + rng.below(3))
            .map(|_| rng.pick(CATEGORIES).to_owned())
            .collect();
        favs.dedup();
        activity.push(row(
            ("user_id", id.clone()),
            recent,
            vec![
                ("sessions_7d", Value::Int64(sessions)),
                ("page_views_7d", Value::Int64(page_views)),
                ("add_to_cart_7d", Value::Int64(carts)),
                ("purchases_30d", Value::Int64(purchases)),
                (
                    "total_spend_30d",
                    Value::Double(round2(purchases as f64 * aov)),
                ),
                (
                    "avg_order_value_30d",
                    if purchases > 0 {
                        Value::Double(aov)
                    } else {
                        Value::Null
                    },
                ),
                (
                    "last_login",
                    Value::Timestamp(recent - rng.below(HOUR as u64) as i64),
                ),
                ("favorite_categories", Value::StringList(favs)),
            ],
        ));
        let v: Vec<f32> = (0..16).map(|_| (rng.f64() * 2.0 - 1.0) as f32).collect();
        let norm = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::EPSILON);
        embedding.push(row(
            ("user_id", id),
            now - rng.below(2 * DAY as u64) as i64,
            vec![(
                "embedding",
                Value::FloatList(v.iter().map(|x| x / norm).collect()),
            )],
        ));
        if profile.len() == batch || u == users {
            for (view, rows) in [
                ("user_profile", &mut profile),
                ("user_activity", &mut activity),
                ("user_embedding", &mut embedding),
            ] {
                out.rows += svc
                    .write_features(&Principal::unrestricted(), view, std::mem::take(rows))
                    .await?
                    .written;
            }
        }
    }
    let mut stats = Vec::with_capacity(batch);
    for p in 1..=products {
        let views = rng.below(5000) as i64;
        let purchases = rng.below(views as u64 / 20 + 1) as i64;
        stats.push(row(
            ("product_id", format!("product_{p}")),
            now - rng.below(12 * HOUR as u64) as i64,
            vec![
                ("category", Value::String(rng.pick(CATEGORIES).to_owned())),
                ("price", Value::Double(round2(2.0 + rng.f64() * 500.0))),
                ("rating", Value::Double(round2(1.0 + rng.f64() * 4.0))),
                ("views_24h", Value::Int64(views)),
                ("purchases_24h", Value::Int64(purchases)),
                (
                    "conversion_rate_24h",
                    Value::Double(if views > 0 {
                        purchases as f64 / views as f64
                    } else {
                        0.0
                    }),
                ),
            ],
        ));
        if stats.len() == batch || p == products {
            out.rows += svc
                .write_features(
                    &Principal::unrestricted(),
                    "product_stats",
                    std::mem::take(&mut stats),
                )
                .await?
                .written;
        }
    }
    Ok(out)
}
