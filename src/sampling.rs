//! Head sampling, decided once when a span starts, configured like the OpenTelemetry SDK
//! (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; default `parentbased_always_on`).
//!
//! The decision is the sampled flag of the span's context: it is what the backends receive, and
//! an unsampled span is never exported. The active sampler lives in atomics, so reading it on the
//! request path costs two relaxed loads and no lock.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use crate::ids::TraceId;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    /// Samples traces whose ID falls below the ratio (same rule as the OpenTelemetry SDKs, so
    /// every tier with the same ratio makes the same decision for a trace).
    Ratio(f64),
    /// At most this many new traces per second (process-wide), with a burst of one second's
    /// worth; for a steady trickle of traces whatever the traffic.
    RateLimit(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    pub root: Root,
    /// Follow the parent's sampled flag when there is a parent (the `parentbased_*` samplers).
    pub parent_based: bool,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler { root: Root::AlwaysOn, parent_based: true }
    }
}

impl Sampler {
    /// Parses the SDK's environment variables (plus `ratelimiting` and `parentbased_ratelimiting`,
    /// whose argument is traces per second). Unknown names are errors (for `vcl.load`).
    pub fn from_env_values(name: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio between 0 and 1")),
            }
        };
        let (root, parent_based) = match name.map(str::trim).filter(|n| !n.is_empty()) {
            None | Some("parentbased_always_on") => (Root::AlwaysOn, true),
            Some("parentbased_always_off") => (Root::AlwaysOff, true),
            Some("parentbased_traceidratio") => (Root::Ratio(ratio()?), true),
            Some("always_on") => (Root::AlwaysOn, false),
            Some("always_off") => (Root::AlwaysOff, false),
            Some("traceidratio") => (Root::Ratio(ratio()?), false),
            Some("ratelimiting") => (Root::RateLimit(rate(arg)?), false),
            Some("parentbased_ratelimiting") => (Root::RateLimit(rate(arg)?), true),
            Some(other) => return Err(format!("OTEL_TRACES_SAMPLER={other:?} is not supported")),
        };
        Ok(Sampler { root, parent_based })
    }

    pub fn from_settings(s: &crate::config::Settings) -> Result<Self, String> {
        Self::from_env_values(s.get("OTEL_TRACES_SAMPLER").as_deref(), s.get("OTEL_TRACES_SAMPLER_ARG").as_deref())
    }

    /// `parent_sampled` is `Some(flag)` when the span has a valid parent context.
    pub fn decide(&self, trace_id: &TraceId, parent_sampled: Option<bool>) -> bool {
        if let (true, Some(flag)) = (self.parent_based, parent_sampled) {
            return flag;
        }
        match self.root {
            Root::AlwaysOn => true,
            Root::AlwaysOff => false,
            Root::Ratio(r) => ratio_keeps(r, trace_id),
            Root::RateLimit(_) => rate_limit_allows(),
        }
    }
}

fn rate(arg: Option<&str>) -> Result<f64, String> {
    // Without an argument, 1 trace per second (the SDK defaults a missing ratio to 1.0 too), so
    // that `opentracing.set()` calls for the sampler and its argument work in either order.
    let a = arg.map(str::trim).filter(|a| !a.is_empty()).unwrap_or("1");
    a.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG={a:?} is not a positive number of traces per second"))
}

// ---- the rate limiter: GCRA over one atomic, shared by every worker thread ----------------

/// The "theoretical arrival time" of the next allowed trace, in ns since `EPOCH`.
static RATE_TAT: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds between two traces at the configured rate.
static RATE_INTERVAL_NS: AtomicU64 = AtomicU64::new(u64::MAX);

fn monotonic_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

/// Whether one more trace fits: each allowed trace moves the arrival time one interval on; a
/// trace is allowed while that time is at most one second ahead of now (the burst).
fn rate_limit_allows() -> bool {
    const BURST_NS: u64 = 1_000_000_000;
    let interval = RATE_INTERVAL_NS.load(Relaxed);
    let now = monotonic_ns();
    let mut tat = RATE_TAT.load(Relaxed);
    loop {
        let next = tat.max(now).saturating_add(interval);
        // The burst is at least one trace: below 1 trace/s the interval exceeds a second.
        if next > now.saturating_add(BURST_NS.max(interval)) {
            return false;
        }
        match RATE_TAT.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(current) => tat = current,
        }
    }
}

fn ratio_bound(ratio: f64) -> u64 {
    (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64
}

/// The rule of the OpenTelemetry SDKs' TraceIdRatioBased sampler: the low 8 bytes of the trace
/// ID, shifted right by one, compared with `ratio * 2^63`.
fn ratio_keeps(ratio: f64, trace_id: &TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let low = u64::from_be_bytes(trace_id.0[8..16].try_into().unwrap_or([0; 8]));
    (low >> 1) < ratio_bound(ratio)
}

// ---- the process-wide active sampler ------------------------------------------------------

const ROOT_ON: u8 = 0;
const ROOT_OFF: u8 = 1;
const ROOT_RATIO: u8 = 2;
const ROOT_RATE: u8 = 3;
const PARENT_BASED: u8 = 0x10;

static ACTIVE_KIND: AtomicU8 = AtomicU8::new(ROOT_ON | PARENT_BASED);
static ACTIVE_RATIO_BITS: AtomicU64 = AtomicU64::new(0);

/// Installs the sampler (CLI thread, when the pipeline starts).
pub fn set_active(s: Sampler) {
    let (root, bits) = match s.root {
        Root::AlwaysOn => (ROOT_ON, 0),
        Root::AlwaysOff => (ROOT_OFF, 0),
        Root::Ratio(r) => (ROOT_RATIO, r.to_bits()),
        Root::RateLimit(r) => {
            RATE_INTERVAL_NS.store((1e9 / r).max(1.0) as u64, Relaxed);
            (ROOT_RATE, r.to_bits())
        }
    };
    ACTIVE_RATIO_BITS.store(bits, Relaxed);
    ACTIVE_KIND.store(root | if s.parent_based { PARENT_BASED } else { 0 }, Relaxed);
}

/// The sampler in force (any thread).
pub fn active() -> Sampler {
    let kind = ACTIVE_KIND.load(Relaxed);
    let root = match kind & 0x0f {
        ROOT_OFF => Root::AlwaysOff,
        ROOT_RATIO => Root::Ratio(f64::from_bits(ACTIVE_RATIO_BITS.load(Relaxed))),
        ROOT_RATE => Root::RateLimit(f64::from_bits(ACTIVE_RATIO_BITS.load(Relaxed))),
        _ => Root::AlwaysOn,
    };
    Sampler { root, parent_based: kind & PARENT_BASED != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(low: u64) -> TraceId {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[8..].copy_from_slice(&low.to_be_bytes());
        TraceId(b)
    }

    #[test]
    fn default_is_parentbased_always_on() {
        let s = Sampler::from_env_values(None, None).unwrap();
        assert_eq!(s, Sampler::default());
        assert!(s.decide(&tid(5), None));
        assert!(s.decide(&tid(5), Some(true)));
        assert!(!s.decide(&tid(5), Some(false)), "an unsampled parent is never forced to sampled");
    }

    #[test]
    fn non_parent_based_samplers_ignore_the_parent() {
        let on = Sampler::from_env_values(Some("always_on"), None).unwrap();
        assert!(on.decide(&tid(5), Some(false)));
        let off = Sampler::from_env_values(Some("always_off"), None).unwrap();
        assert!(!off.decide(&tid(5), Some(true)));
        let pb_off = Sampler::from_env_values(Some("parentbased_always_off"), None).unwrap();
        assert!(pb_off.decide(&tid(5), Some(true)));
        assert!(!pb_off.decide(&tid(5), None));
    }

    #[test]
    fn ratio_follows_the_sdk_rule_at_the_boundary() {
        let s = Sampler::from_env_values(Some("traceidratio"), Some("0.5")).unwrap();
        // bound = 2^62; low >> 1 must be below it
        assert!(s.decide(&tid((1u64 << 63) - 2), None));
        assert!(!s.decide(&tid(1u64 << 63), None));
        let zero = Sampler::from_env_values(Some("traceidratio"), Some("0")).unwrap();
        assert!(!zero.decide(&tid(0), None));
        let one = Sampler::from_env_values(Some("traceidratio"), Some("1")).unwrap();
        assert!(one.decide(&tid(u64::MAX), None));
    }

    #[test]
    fn ratio_samples_about_the_requested_share_of_random_traces() {
        let s = Sampler::from_env_values(Some("parentbased_traceidratio"), Some("0.1")).unwrap();
        let n = 100_000;
        let kept = (0..n).filter(|_| s.decide(&TraceId::random(), None)).count();
        // 10% of 100k: the binomial standard deviation is ~95, so +-1000 cannot fail by chance.
        assert!((9_000..11_000).contains(&kept), "kept {kept}");
        // with a parent, the parent decides
        assert!(s.decide(&tid(u64::MAX), Some(true)));
    }

    #[test]
    fn bad_settings_name_the_variable() {
        let e = Sampler::from_env_values(Some("sometimes"), None).unwrap_err();
        assert!(e.contains("OTEL_TRACES_SAMPLER"));
        let e = Sampler::from_env_values(Some("traceidratio"), Some("1.5")).unwrap_err();
        assert!(e.contains("OTEL_TRACES_SAMPLER_ARG"));
        let e = Sampler::from_env_values(Some("traceidratio"), Some("abc")).unwrap_err();
        assert!(e.contains("OTEL_TRACES_SAMPLER_ARG"));
    }

    #[test]
    fn rate_limiting_allows_the_burst_then_the_rate() {
        let s = Sampler::from_env_values(Some("ratelimiting"), Some("10")).unwrap();
        assert_eq!(s.root, Root::RateLimit(10.0));
        assert!(Sampler::from_env_values(Some("ratelimiting"), Some("0")).unwrap_err().contains("traces per second"));
        assert_eq!(Sampler::from_env_values(Some("ratelimiting"), None).unwrap().root, Root::RateLimit(1.0));
        let pb = Sampler::from_env_values(Some("parentbased_ratelimiting"), Some("1")).unwrap();
        assert!(pb.parent_based && pb.decide(&tid(1), Some(true)));
        // The limiter itself, driven directly: a burst of one second's worth (10), then no more
        // until time passes. Decisions in a tight loop take far less than the 100 ms interval.
        RATE_INTERVAL_NS.store(100_000_000, Relaxed);
        RATE_TAT.store(0, Relaxed);
        let allowed = (0..1000).filter(|_| rate_limit_allows()).count();
        assert!((10..=11).contains(&allowed), "allowed {allowed}");
        RATE_TAT.store(monotonic_ns().saturating_sub(2_000_000_000), Relaxed);
        assert!(rate_limit_allows(), "allowed again once the arrival time is in the past");
        // Below one trace per second: one trace, then none until the interval has passed.
        RATE_INTERVAL_NS.store(2_000_000_000, Relaxed);
        RATE_TAT.store(0, Relaxed);
        assert_eq!((0..100).filter(|_| rate_limit_allows()).count(), 1);
    }

    #[test]
    fn active_sampler_round_trips_through_the_atomics() {
        let s = Sampler { root: Root::Ratio(0.25), parent_based: false };
        set_active(s);
        assert_eq!(active(), s);
        set_active(Sampler::default());
        assert_eq!(active(), Sampler::default());
    }
}
