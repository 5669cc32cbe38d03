//! GuestDetails: what the guest kernel reports about itself and the agent.
use std::fs;

use shoji_agent_api::types::GuestDetailsResponse;

/// A `/proc/meminfo` or `/proc/self/status` line in kB, as bytes.
fn kb_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

pub fn details() -> GuestDetailsResponse {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut d = GuestDetailsResponse::new();
    d.kernel_release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    d.cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    d.mem_total_bytes = kb_field(&meminfo, "MemTotal");
    d.mem_used_bytes = d
        .mem_total_bytes
        .saturating_sub(kb_field(&meminfo, "MemAvailable"));
    d.agent_rss_bytes = kb_field(&status, "VmRSS");
    d.boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string();
    d.hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields() {
        let text = "MemTotal:         239016 kB\nMemFree:          200000 kB\nMemAvailable:     229000 kB\n";
        assert_eq!(kb_field(text, "MemTotal"), 239016 * 1024);
        assert_eq!(kb_field(text, "MemAvailable"), 229000 * 1024);
        assert_eq!(kb_field(text, "Mem"), 0);
    }
}
