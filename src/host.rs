//! Facts about the machine guestd runs on, read on request (no polling loop): CPU, memory and
//! disk use for `GET /metrics`.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// A `/proc/stat` CPU sample: (busy + idle jiffies, idle jiffies).
type CpuSample = (u64, u64);

/// Host metrics in envd's `/metrics` shape and field order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metrics {
    pub ts: u64,
    pub cpu_count: usize,
    /// CPU use since the previous call (the first call: since guestd started), percent.
    pub cpu_used_pct: f32,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// Reading a metric source failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("reading {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field}")]
    Missing { path: &'static str, field: &'static str },
    #[error("statfs /")]
    Statfs(#[source] nix::Error),
}

/// Computes metrics; keeps the previous CPU sample so `cpu_used_pct` covers the time between calls.
#[derive(Debug)]
pub struct MetricsSource {
    last_cpu: Mutex<Option<CpuSample>>,
}

impl Default for MetricsSource {
    fn default() -> Self {
        MetricsSource::new()
    }
}

impl MetricsSource {
    pub fn new() -> MetricsSource {
        MetricsSource { last_cpu: Mutex::new(read_stat().ok().map(|(sample, _)| sample)) }
    }

    pub fn collect(&self) -> Result<Metrics, MetricsError> {
        let (now, cpu_count) = read_stat()?;
        let previous = self.last_cpu.lock().unwrap_or_else(|p| p.into_inner()).replace(now);
        let cpu_used_pct = previous.map_or(0.0, |prev| cpu_percent(prev, now));
        let mem = meminfo()?;
        let disk = nix::sys::statvfs::statvfs("/").map_err(MetricsError::Statfs)?;
        let block = disk.fragment_size();
        // Saturating: the numbers are whatever a filesystem (FUSE, network) chooses to report.
        let disk_total = disk.blocks().saturating_mul(block);
        let disk_used = disk.blocks().saturating_sub(disk.blocks_available()).saturating_mul(block);
        const MIB: u64 = 1 << 20;
        Ok(Metrics {
            ts: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            cpu_count,
            cpu_used_pct: (cpu_used_pct * 100.0).round() / 100.0,
            mem_total_mib: mem.total / MIB,
            mem_used_mib: mem.used / MIB,
            mem_total: mem.total,
            mem_used: mem.used,
            mem_cache: mem.cache,
            disk_used,
            disk_total,
        })
    }
}

fn cpu_percent((total0, idle0): CpuSample, (total1, idle1): CpuSample) -> f32 {
    let total = total1.saturating_sub(total0);
    let idle = idle1.saturating_sub(idle0);
    if total == 0 { 0.0 } else { (total - idle.min(total)) as f32 * 100.0 / total as f32 }
}

/// The aggregate CPU sample and the number of logical CPUs, from one read of `/proc/stat`.
fn read_stat() -> Result<(CpuSample, usize), MetricsError> {
    const PATH: &str = "/proc/stat";
    let stat = std::fs::read_to_string(PATH).map_err(|source| MetricsError::Read { path: PATH, source })?;
    let sample = parse_cpu_line(&stat).ok_or(MetricsError::Missing { path: PATH, field: "cpu line" })?;
    Ok((sample, count_cpus(&stat)))
}

/// Logical CPUs: one `cpuN` line each (gopsutil's `cpu.Counts(true)`, what envd reports, and
/// the CPUs the aggregate `cpu` line sums over). Not `available_parallelism`, which counts
/// only the CPUs guestd's own affinity mask and cgroup quota let it use.
fn count_cpus(stat: &str) -> usize {
    let n = stat
        .lines()
        .filter(|l| l.strip_prefix("cpu").is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit())))
        .count();
    n.max(1)
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`; guest time is
/// already part of user/nice, so it is not added again.
fn parse_cpu_line(stat: &str) -> Option<CpuSample> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line.split_whitespace().skip(1).take(8).filter_map(|v| v.parse().ok()).collect();
    if values.len() < 4 {
        return None;
    }
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((values.iter().sum(), idle))
}

struct Mem {
    total: u64,
    used: u64,
    cache: u64,
}

/// The machine's memory (`MemTotal`) in bytes.
pub fn mem_total() -> Option<u64> {
    meminfo().ok().map(|mem| mem.total)
}

fn meminfo() -> Result<Mem, MetricsError> {
    const PATH: &str = "/proc/meminfo";
    let text = std::fs::read_to_string(PATH).map_err(|source| MetricsError::Read { path: PATH, source })?;
    parse_meminfo(&text)
}

/// gopsutil's definitions (what envd reports): used = total − free − buffers − cached, where
/// cached includes SReclaimable.
fn parse_meminfo(text: &str) -> Result<Mem, MetricsError> {
    let field = |name: &'static str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or(MetricsError::Missing { path: "/proc/meminfo", field: name })
    };
    let total = field("MemTotal")?;
    let free = field("MemFree")?;
    let buffers = field("Buffers").unwrap_or(0);
    let cache = field("Cached").unwrap_or(0) + field("SReclaimable").unwrap_or(0);
    Ok(Mem { total, used: total.saturating_sub(free + buffers + cache), cache })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_from_two_samples() {
        let stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_cpu_line(stat), Some((1000, 800)));
        assert_eq!(count_cpus(stat), 1);
        assert_eq!(count_cpus("cpu  1 2 3 4\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 5\n"), 2);
        assert_eq!(cpu_percent((1000, 800), (2000, 1300)), 50.0);
        assert_eq!(cpu_percent((1000, 800), (1000, 800)), 0.0);
    }

    #[test]
    fn memory_like_gopsutil() {
        let text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 200 kB\nSReclaimable: 50 kB\n";
        let mem = parse_meminfo(text).unwrap();
        assert_eq!(mem.total, 1_024_000);
        assert_eq!(mem.cache, 250 * 1024);
        assert_eq!(mem.used, 600 * 1024);
        assert!(parse_meminfo("MemFree: 1 kB").is_err());
    }

    #[test]
    fn live_metrics_are_plausible() {
        let source = MetricsSource::new();
        let m = source.collect().unwrap();
        assert!(m.mem_total > 0 && m.mem_used <= m.mem_total);
        assert!(m.disk_total > 0 && m.disk_used <= m.disk_total);
        assert!(m.cpu_count >= 1);
        assert!((0.0..=100.0).contains(&m.cpu_used_pct));
    }
}
