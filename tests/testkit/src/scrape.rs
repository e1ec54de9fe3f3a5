//! Reading what a process exposes: its Prometheus text over plain HTTP, its CPU time from `/proc`; and how busy
//! the whole machine's CPUs were.

/// The body of a plain HTTP/1.1 `GET` (an admin or metrics endpoint), `None` if the connection fails.
pub async fn http_get(host: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// One series' value from the Prometheus text (`name` with its labels, as exposed), 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The sum of every series of a metric (all label sets), 0 when absent.
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            let base = n.split('{').next()?;
            (base == family).then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// User + system CPU seconds a process used so far, all its threads (`"self"` for this one); 0 when unreadable.
pub fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces and parentheses: the fields start after its last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state(0) ... utime(11) stime(12), in clock ticks (100/s on Linux).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds the whole machine has spent busy since boot, every process and the kernel (`/proc/stat`); 0 when
/// unreadable. The difference over a run, against its wall time × the cores, shows whether the run was CPU-bound.
pub fn machine_busy_secs() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| busy_ticks(&stat))
        .map_or(0.0, |ticks| ticks as f64 / 100.0)
}

/// user + nice + system + irq + softirq + steal of the first (`cpu`, all cores) line, in clock ticks (100/s on
/// Linux); idle and iowait are not busy, and guest time is already counted in user.
fn busy_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied();
    Some(field(0)? + field(1)? + field(2)? + field(5)? + field(6)? + field(7).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_total X.\n# TYPE x_total counter\nx_total{repo=\"a\"} 2\nx_total{repo=\"b\"} 3\nx_total_more 7\ny 1.5\n";

    #[test]
    fn series_and_families_are_read_from_the_exposition() {
        assert_eq!(metric(TEXT, "x_total{repo=\"b\"}"), 3.0);
        assert_eq!(metric(TEXT, "y"), 1.5);
        assert_eq!(metric(TEXT, "absent"), 0.0);
        // A longer name with the same prefix is another family.
        assert_eq!(metric_sum(TEXT, "x_total"), 5.0);
        assert_eq!(metric_sum(TEXT, "absent"), 0.0);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_secs("self") > 0.0);
        assert_eq!(cpu_secs("not-a-pid"), 0.0);
    }

    #[test]
    fn the_machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 20 30 5000 400 6 7 8 0 0\ncpu0 50 10 15 2500 200 3 3 4 0 0\n";
        assert_eq!(busy_ticks(stat), Some(100 + 20 + 30 + 6 + 7 + 8));
        assert_eq!(busy_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(busy_ticks("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert!(machine_busy_secs() > 0.0);
    }
}
