//! Prometheus text exposition, written by hand: a few counters, two gauges and four histograms.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bucket bounds in seconds, for time to first token and time per output token.
const TTFT_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];
/// Bucket bounds in seconds for the time waiting for a slot, and for a request's whole time.
const QUEUE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const E2E_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
];
const TPOT_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
];

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// The server's counters; shared by the handlers and the scheduler.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values the prefix cache gave, and those prefilled.
    pub prefix_hit_tokens: AtomicU64,
    pub prefix_miss_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Choices waiting for a slot.
    pub queued: AtomicI64,
    /// Sequences in the running batch.
    pub running: AtomicI64,
    ttft: Mutex<Histogram>,
    tpot: Mutex<Histogram>,
    queue: Mutex<Histogram>,
    e2e: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            prefix_miss_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queued: AtomicI64::new(0),
            running: AtomicI64::new(0),
            ttft: Mutex::new(Histogram::new(&TTFT_BUCKETS)),
            tpot: Mutex::new(Histogram::new(&TPOT_BUCKETS)),
            queue: Mutex::new(Histogram::new(&QUEUE_BUCKETS)),
            e2e: Mutex::new(Histogram::new(&E2E_BUCKETS)),
        }
    }
}

impl Metrics {
    /// A request to `endpoint` answered with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_owned(), status)).or_default() += 1;
        }
    }

    pub fn observe_ttft(&self, secs: f64) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(secs);
        }
    }

    pub fn observe_tpot(&self, secs: f64) {
        if let Ok(mut h) = self.tpot.lock() {
            h.observe(secs);
        }
    }

    /// Time from a request's arrival until its first sequence took a slot.
    pub fn observe_queue(&self, secs: f64) {
        if let Ok(mut h) = self.queue.lock() {
            h.observe(secs);
        }
    }

    /// A request's whole time, from arrival to its last token.
    pub fn observe_e2e(&self, secs: f64) {
        if let Ok(mut h) = self.e2e.lock() {
            h.observe(secs);
        }
    }

    /// The exposition, Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP gpt2_requests_total HTTP requests by endpoint and status.\n# TYPE gpt2_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((e, s), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "gpt2_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
        }
        let counters = [
            (
                "gpt2_prompt_tokens_total",
                "Prompt tokens of the requests run (cached or prefilled).",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "gpt2_prefix_cache_hit_tokens_total",
                "Prompt tokens whose keys and values came from the prefix cache.",
                self.prefix_hit_tokens.load(Ordering::Relaxed),
            ),
            (
                "gpt2_prefix_cache_miss_tokens_total",
                "Prompt tokens prefilled (not in the prefix cache).",
                self.prefix_miss_tokens.load(Ordering::Relaxed),
            ),
            (
                "gpt2_generation_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "gpt2_queue_length",
                "Sequences waiting for a slot.",
                self.queued.load(Ordering::Relaxed),
            ),
            (
                "gpt2_running_sequences",
                "Sequences in the running batch.",
                self.running.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.max(0)
            );
        }
        if let Ok(h) = self.ttft.lock() {
            h.write(
                &mut out,
                "gpt2_time_to_first_token_seconds",
                "Time from a request's arrival to its first token.",
            );
        }
        if let Ok(h) = self.tpot.lock() {
            h.write(
                &mut out,
                "gpt2_time_per_output_token_seconds",
                "Mean time between a request's tokens after the first.",
            );
        }
        if let Ok(h) = self.queue.lock() {
            h.write(
                &mut out,
                "gpt2_queue_time_seconds",
                "Time from a request's arrival until its first sequence took a slot.",
            );
        }
        if let Ok(h) = self.e2e.lock() {
            h.write(
                &mut out,
                "gpt2_e2e_request_latency_seconds",
                "Time from a request's arrival to its end.",
            );
        }
        out
    }
}
