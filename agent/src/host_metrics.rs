//! CPU, memory and disk figures of the host, sampled once per heartbeat.

use std::path::PathBuf;

use drover_common::proto::HostMetrics;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Keeps the previous CPU counters so each sample reports the usage since
/// the one before it.
pub struct HostSampler {
    system: System,
    data_dir: PathBuf,
}

impl HostSampler {
    pub fn new(data_dir: PathBuf) -> Result<HostSampler, sysinfo::Error> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        )?;
        Ok(HostSampler { system, data_dir })
    }

    pub fn sample(&mut self) -> HostMetrics {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let (disk_total_bytes, disk_available_bytes) = crate::disk::space(&self.data_dir)
            .unwrap_or_else(|| {
                tracing::debug!(dir = %self.data_dir.display(), "statvfs failed");
                (0, 0)
            });
        HostMetrics {
            cpu_usage: f64::from(self.system.global_cpu_usage()) / 100.0,
            cpu_cores: self.system.cpus().len() as u32,
            load_average_1m: System::load_average().map(|l| l.one).unwrap_or(0.0),
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            disk_total_bytes,
            disk_available_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_real() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = HostSampler::new(dir.path().to_path_buf()).unwrap();
        let m = s.sample();
        assert!(m.cpu_cores >= 1);
        assert!(m.memory_total_bytes > 0 && m.memory_used_bytes <= m.memory_total_bytes);
        assert!(m.disk_total_bytes > 0 && m.disk_available_bytes <= m.disk_total_bytes);
        assert!((0.0..=1.0).contains(&m.cpu_usage));
    }
}
