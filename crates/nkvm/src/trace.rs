//! Tracing: every exit can be observed — the RFC's reason for a pointer
//! parameter instead of a shared page ("better for things like strace").
//!
//! A [`Tracer`] attached to a vCPU receives one [`ExitRecord`] per exit: the
//! exit itself, the time spent in the guest before it and the time the VMM
//! spent handling it (until the next `enter_guest`). With no tracer attached
//! the cost is one branch per exit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Exit;

/// One traced exit.
#[derive(Debug, Clone)]
pub struct ExitRecord {
    /// The vCPU's id.
    pub vcpu: u32,
    /// Sequence number of the exit on this vCPU (from 0).
    pub seq: u64,
    /// The exit.
    pub exit: Exit,
    /// Time inside `KVM_RUN` that ended with this exit.
    pub guest_time: Duration,
    /// Time from this exit until the VMM entered the guest again (`None` for
    /// the last exit of a vCPU that did not enter again).
    pub handler_time: Option<Duration>,
}

/// Receives every exit of the vCPUs it is attached to.
pub trait Tracer: Send {
    /// Called once per exit, when the handler time is known (at the next
    /// entry) or when the vCPU is dropped.
    fn on_exit(&mut self, record: &ExitRecord);
}

/// Prints one line per exit to a writer: the `--trace` output.
///
/// `vcpu=0 #12 io-out port=0x03f8 size=1 data=0x48 guest=8.1us handler=2.3us`
#[derive(Debug)]
pub struct LineTracer<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> LineTracer<W> {
    /// Traces to `out`.
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write + Send> Tracer for LineTracer<W> {
    fn on_exit(&mut self, r: &ExitRecord) {
        let handler = match r.handler_time {
            Some(h) => format!("{:.1}us", h.as_secs_f64() * 1e6),
            None => "-".to_string(),
        };
        // Tracing must never take the VM down: a closed pipe just loses lines.
        let _ = writeln!(
            self.out,
            "vcpu={} #{} {} guest={:.1}us handler={}",
            r.vcpu,
            r.seq,
            r.exit,
            r.guest_time.as_secs_f64() * 1e6,
            handler
        );
    }
}

/// Exit statistics per reason (count, handler-latency percentiles), shared
/// by all the vCPUs it is attached to: the `--stats` table, like `perf kvm stat`.
#[derive(Debug, Clone, Default)]
pub struct ExitStats {
    inner: Arc<Mutex<BTreeMap<&'static str, ReasonStats>>>,
}

#[derive(Debug, Default, Clone)]
struct ReasonStats {
    count: u64,
    guest_ns: u128,
    handler: Histogram,
}

/// A log-linear histogram of nanosecond latencies (16 sub-buckets per power
/// of two: about 6% resolution, bounded memory).
#[derive(Debug, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { buckets: vec![0; 64 * 16], count: 0, max: 0 }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // >= 4
        let sub = ((v >> (e - 4)) & 15) as usize;
        (e - 3) * 16 + sub
    }

    fn lower_bound(idx: usize) -> u64 {
        if idx < 16 {
            return idx as u64;
        }
        let e = idx / 16 + 3;
        let sub = (idx % 16) as u64;
        (16 + sub) << (e - 4)
    }

    fn record(&mut self, v: u64) {
        self.buckets[Self::index(v).min(64 * 16 - 1)] += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        if rank >= self.count {
            return self.max;
        }
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::lower_bound(i).min(self.max);
            }
        }
        self.max
    }
}

/// One row of [`ExitStats::rows`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatsRow {
    /// The exit reason ([`Exit::reason`]).
    pub reason: &'static str,
    /// Number of exits.
    pub count: u64,
    /// Mean time in the guest before such an exit.
    pub guest_mean: Duration,
    /// Handler latency, median.
    pub p50: Duration,
    /// Handler latency, 90th percentile.
    pub p90: Duration,
    /// Handler latency, 99th percentile.
    pub p99: Duration,
    /// Handler latency, maximum.
    pub max: Duration,
}

impl ExitStats {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracer feeding this table (attach one per vCPU).
    pub fn tracer(&self) -> Box<dyn Tracer> {
        Box::new(self.clone())
    }

    /// Total exits recorded.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).values().map(|s| s.count).sum()
    }

    /// The rows, most frequent reason first.
    pub fn rows(&self) -> Vec<StatsRow> {
        let table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ns = Duration::from_nanos;
        let mut rows: Vec<StatsRow> = table
            .iter()
            .map(|(reason, s)| StatsRow {
                reason,
                count: s.count,
                guest_mean: ns((s.guest_ns / u128::from(s.count.max(1))) as u64),
                p50: ns(s.handler.percentile(50.0)),
                p90: ns(s.handler.percentile(90.0)),
                p99: ns(s.handler.percentile(99.0)),
                max: ns(s.handler.max),
            })
            .collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.reason.cmp(b.reason)));
        rows
    }

    /// The table as text, one row per reason.
    pub fn render(&self) -> String {
        let rows = self.rows();
        let total: u64 = rows.iter().map(|r| r.count).sum();
        let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<18} {:>9} {:>7} {:>11} {:>9} {:>9} {:>9} {:>9}",
            "exit reason", "count", "%", "guest(us)", "p50(us)", "p90(us)", "p99(us)", "max(us)"
        );
        for r in &rows {
            let _ = writeln!(
                s,
                "{:<18} {:>9} {:>6.2}% {:>11} {:>9} {:>9} {:>9} {:>9}",
                r.reason,
                r.count,
                100.0 * r.count as f64 / total.max(1) as f64,
                us(r.guest_mean),
                us(r.p50),
                us(r.p90),
                us(r.p99),
                us(r.max)
            );
        }
        let _ = writeln!(s, "{:<18} {:>9}", "total", total);
        s
    }
}

impl Tracer for ExitStats {
    fn on_exit(&mut self, r: &ExitRecord) {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let s = table.entry(r.exit.reason()).or_default();
        s.count += 1;
        s.guest_ns += r.guest_time.as_nanos();
        if let Some(h) = r.handler_time {
            s.handler.record(h.as_nanos() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_within_resolution() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "p50 {p50}");
        let p99 = h.percentile(99.0) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "p99 {p99}");
        assert_eq!(h.percentile(100.0), 1_000_000);
        for v in [0u64, 1, 15, 16, 17, 1 << 20, u64::MAX >> 1] {
            assert!(Histogram::lower_bound(Histogram::index(v)) <= v);
        }
    }

    #[test]
    fn stats_count_per_reason() {
        let mut stats = ExitStats::new();
        for i in 0..10 {
            stats.on_exit(&ExitRecord {
                vcpu: 0,
                seq: i,
                exit: if i % 2 == 0 { Exit::Hlt } else { Exit::IoIn { port: 1, size: 1 } },
                guest_time: Duration::from_micros(1),
                handler_time: Some(Duration::from_micros(i)),
            });
        }
        let rows = stats.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.iter().map(|r| r.count).sum::<u64>(), 10);
        assert!(stats.render().contains("io-in"));
    }
}
