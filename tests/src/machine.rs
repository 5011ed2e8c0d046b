//! Facts about the machine and its processes that every benchmark report prints: CPU model,
//! memory, load average, a command's output, a process's CPU time. One place, so the reports
//! of `bench`, `collector-bench`, `live-bench` and `latency-bench` say the same thing the same
//! way.

use std::io::Read;
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

/// A command's stdout (its stderr when stdout is empty), trimmed; `None` when it cannot run.
pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(program).args(args).output().ok()?;
    let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
    Some(String::from_utf8_lossy(&text).trim().to_string())
}

/// The value after `key:` on the first line of a `/proc` file that starts with `key`.
pub fn proc_field(path: &str, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
}

/// The CPU's model name, or `unknown`.
pub fn cpu_model() -> String {
    proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into())
}

/// Total memory in whole GiB (`24 GiB`), or `?`.
pub fn mem_total() -> String {
    proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next().and_then(|kib| kib.parse::<f64>().ok()))
        .map_or("?".into(), |kib| format!("{:.0} GiB", kib / 1048576.0))
}

/// The 1, 5 and 15 minute load averages (`1.03 1.55 2.35`), or empty.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// CPU time (user + system) a process (`self` or a pid) used so far, from `/proc/PID/stat`;
/// `None` when it is gone.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    static CLOCK_TICKS: OnceLock<u64> = OnceLock::new();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = *CLOCK_TICKS
        .get_or_init(|| command_output("getconf", &["CLK_TCK"]).and_then(|s| s.parse().ok()).unwrap_or(100));
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Waits at most `timeout` for `child`, reading its piped stdout and stderr meanwhile (so a
/// chatty child never blocks on a full pipe); `None` when it overstayed, after killing it.
/// Streams not piped come back empty.
pub fn wait_bounded(mut child: Child, timeout: Duration) -> Option<Output> {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    Some(Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
}
