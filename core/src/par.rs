//! Order-preserving parallel map on scoped threads, for the CPU-bound
//! steps of ingest (decoding, merging tile states) and of the batch layer
//! (scanning feature batches, folding aggregation windows), so one process
//! uses more than one core while its async I/O stays on the runtime.

/// Maps `f` over `items` on up to `available_parallelism` (at most 4)
/// scoped threads, keeping order. Fewer than `min_items` items (or one
/// core) run inline.
pub fn par_map<T: Send, R: Send>(
    items: Vec<T>,
    min_items: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if threads < 2 || items.len() < min_items.max(2) {
        return items.into_iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let mut parts: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut it = items.into_iter();
    loop {
        let part: Vec<T> = it.by_ref().take(per).collect();
        if part.is_empty() {
            break;
        }
        parts.push(part);
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn par_map_keeps_order_small_and_large() {
        let small: Vec<u64> = (0..10).collect();
        assert_eq!(
            super::par_map(small, 512, |x| x * 2),
            (0..10).map(|x| x * 2).collect::<Vec<_>>()
        );
        let large: Vec<u64> = (0..10_001).collect();
        let out = super::par_map(large, 512, |x| x + 1);
        assert_eq!(out, (1..10_002).collect::<Vec<_>>());
    }
}
