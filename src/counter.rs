//! A counter that every worker thread adds to at every request, without making the CPUs take
//! turns at one cache line.
//!
//! Why: a single atomic added to by workers on different CPUs moves its cache line from CPU to
//! CPU at every request (each `lock add` waits for the line to come over), and `spans_started`
//! is added to by every request the module sees, sampled or not. Varnish keeps its own
//! per-request counters per worker for the same reason (`wrk->stats`, summed later). Here the
//! counter is split into shards, each on its own cache line, and a thread adds to the shard of
//! its stack: threads on different CPUs seldom share one. Reading sums the shards (the exporter
//! thread, once a tick), so a read may miss adds made meanwhile, never count one twice.
//!
//! Threading: any thread may add and read; all operations are relaxed atomics (a counter orders
//! nothing).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SHARD_BITS: u32 = 4;
const SHARDS: usize = 1 << SHARD_BITS;

/// One shard, alone on its cache line (128 bytes: some CPUs fetch lines in adjacent pairs).
#[repr(align(128))]
struct Shard(AtomicU64);

pub struct ShardedCounter {
    shards: [Shard; SHARDS],
}

impl ShardedCounter {
    pub const fn new() -> Self {
        ShardedCounter { shards: [const { Shard(AtomicU64::new(0)) }; SHARDS] }
    }

    pub fn add(&self, n: u64) {
        self.shards[shard_of_this_thread()].0.fetch_add(n, Relaxed);
    }

    /// The total of all adds that happened before the call (and perhaps some made meanwhile).
    pub fn sum(&self) -> u64 {
        self.shards.iter().fold(0u64, |total, s| total.wrapping_add(s.0.load(Relaxed)))
    }
}

impl Default for ShardedCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// The shard of the calling thread, from the address of its stack: each thread has its own
/// stack (Varnish's workers at least `thread_pool_stack`, tens of KiB, apart), while one thread's
/// calls differ by a few KiB of stack depth at most, so the address at 16 KiB granularity,
/// hashed, names the thread well enough. No thread-local storage: in a loaded library that is a
/// call to `__tls_get_addr` on every access. Two threads that share a shard, or one thread whose
/// stack depth crosses a 16 KiB boundary between calls, cost only the sharing; the sum is right
/// whatever shard an add lands in.
#[inline]
fn shard_of_this_thread() -> usize {
    let marker = 0u8;
    let at = std::ptr::addr_of!(marker) as usize as u64;
    // Fibonacci hashing: the top bits of the product mix every bit of the stack's address.
    ((at >> 14).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - SHARD_BITS)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Barrier, Mutex};

    #[test]
    fn the_sum_counts_every_add_from_every_thread() {
        let counter = Arc::new(ShardedCounter::new());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        counter.add(1);
                    }
                    counter.add(t);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.sum(), 8 * 10_000 + (0..8).sum::<u64>());
    }

    #[test]
    fn threads_spread_over_several_shards() {
        // All alive at once, so that their stacks are distinct.
        let n = 8;
        let barrier = Arc::new(Barrier::new(n));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (barrier, seen) = (barrier.clone(), seen.clone());
                std::thread::spawn(move || {
                    let shard = shard_of_this_thread();
                    barrier.wait();
                    seen.lock().unwrap().push(shard);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let distinct: HashSet<usize> = seen.lock().unwrap().iter().copied().collect();
        // Eight threads' stacks (2 MiB apart by default) in one shard of 16 would mean the hash
        // ignores the address.
        assert!(distinct.len() >= 2, "all threads in one shard: {distinct:?}");
    }

    #[test]
    fn each_shard_has_a_cache_line_of_its_own() {
        assert_eq!(std::mem::align_of::<Shard>(), 128);
        assert_eq!(std::mem::size_of::<ShardedCounter>(), SHARDS * 128);
    }
}
