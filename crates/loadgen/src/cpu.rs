//! CPU time, read from Linux's `/proc`: of a process (user + system, 1/100 s ticks) and of
//! single threads (nanoseconds on the CPU, from `schedstat`), for the load generator's and the
//! benchmarks' accounting. Elsewhere (or without `/proc`) every reading is `None`.

/// CPU seconds (user + system) used so far by process `pid`, or by this process. Linux only;
/// `/proc/<pid>/stat` counts in clock ticks of 1/100 s (USER_HZ is 100 on every Linux ABI).
pub fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces; fields after its closing paren are plain.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// This thread's id (Linux's tid), from `/proc/thread-self`.
pub fn current_thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// Seconds thread `tid` of this process has spent on a CPU (its first `schedstat` field, in
/// nanoseconds); `None` once it has exited.
pub fn thread_cpu_seconds(tid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_threads_cpu_time_grows_with_work() {
        let tid = current_thread_id().unwrap();
        let before = thread_cpu_seconds(tid).unwrap();
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_seconds(tid).unwrap() > before);
        assert!(process_cpu_seconds(None).is_some());
    }
}
