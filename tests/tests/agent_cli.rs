//! The agent as a user runs it: real pcap files written from packet ladders, damaged in the ways
//! captures get damaged, fed to the `rstscope-agent` binary. Every bad input must give a clear
//! one-line error naming the file, lose nothing else, and set the exit status only when nothing
//! at all could be read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rstscope_tests::corpus::Agent;
use rstscope_tests::frames::write_pcap;
use serde_json::Value;

/// A client-side ladder with one refused connection and one app abort.
const LADDER: &str = "
    0ms    > S    cport=40001 sport=8443
    0.4ms  < RA
    100ms  > S    cport=40002 sport=80
    101ms  < SA
    102ms  > A
    103ms  > PA   len=300
    110ms  < RA
";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rstscope-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn ladder_pcap(&self, file: &str) -> PathBuf {
        let path = self.path(file);
        let segments = rstscope_agent::trace::parse(LADDER).expect("valid ladder");
        write_pcap(&path, &segments).expect("write pcap");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn agent() -> Agent {
    Agent::locate_or_build()
}

fn run(args: &[&Path]) -> Output {
    let mut cmd = Command::new(agent().exe);
    for a in args {
        cmd.arg("--read").arg(a);
    }
    cmd.args(["-o", "json"]).output().expect("run agent")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect()
}

fn of_type<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|v| v["type"] == kind).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_good_capture_gives_resets_flows_and_stats() {
    let scratch = Scratch::new("good");
    let pcap = scratch.ladder_pcap("good.pcap");
    let out = run(&[&pcap]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = lines(&out);
    let resets = of_type(&lines, "reset");
    let causes: Vec<&str> = resets.iter().map(|r| r["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["refused", "app-abort"]);
    assert_eq!(resets[0]["src"], "203.0.113.9:8443");
    assert_eq!(resets[0]["flags"], "RA");
    assert_eq!(of_type(&lines, "flow").len(), 2);
    let stats = lines.last().unwrap();
    assert_eq!(stats["type"], "stats");
    assert_eq!(
        (stats["packets"].as_u64(), stats["resets"].as_u64(), stats["flows"].as_u64()),
        (Some(7), Some(2), Some(2))
    );
}

#[test]
fn a_missing_file_is_named_and_fails_the_run() {
    let scratch = Scratch::new("missing");
    let missing = scratch.path("nope.pcap");
    let out = run(&[&missing]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("nope.pcap") && err.contains("No such file"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line per problem: {err}");
}

#[test]
fn a_text_file_is_not_a_capture() {
    let scratch = Scratch::new("text");
    let text = scratch.path("notes.txt");
    std::fs::write(&text, "this is not a capture file\n").unwrap();
    let out = run(&[&text]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("notes.txt: not a pcap or pcapng file"), "{}", stderr(&out));
}

#[test]
fn a_truncated_capture_keeps_every_complete_packet() {
    let scratch = Scratch::new("truncated");
    let pcap = scratch.ladder_pcap("cut.pcap");
    let bytes = std::fs::read(&pcap).unwrap();
    std::fs::write(&pcap, &bytes[..bytes.len() - 20]).unwrap();
    let out = run(&[&pcap]);
    assert!(out.status.success(), "something was read, so the run succeeds: {}", stderr(&out));
    assert!(stderr(&out).contains("cut.pcap: truncated at byte"), "{}", stderr(&out));
    let lines = lines(&out);
    let stats = lines.last().unwrap();
    assert_eq!(stats["packets"].as_u64(), Some(6));
    assert_eq!(stats["errors"].as_array().map(Vec::len), Some(1));
    // The refused connection is complete and reported.
    assert_eq!(of_type(&lines, "reset")[0]["cause"], "refused");
}

#[test]
fn a_corrupt_record_length_is_skipped_and_the_rest_is_read() {
    let scratch = Scratch::new("corrupt");
    let pcap = scratch.ladder_pcap("bad-len.pcap");
    let mut bytes = std::fs::read(&pcap).unwrap();
    // Second record header starts after the global header and the first record.
    let first_len = u32::from_le_bytes(bytes[24 + 8..24 + 12].try_into().unwrap()) as usize;
    let second = 24 + 16 + first_len;
    bytes[second + 8..second + 12].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
    std::fs::write(&pcap, &bytes).unwrap();
    let out = run(&[&pcap]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("bad-len.pcap: corrupt record at byte {second}")), "{}", stderr(&out));
    let lines = lines(&out);
    // One packet lost (the RST+ACK of the refused connection); the app abort is still found.
    assert_eq!(lines.last().unwrap()["packets"].as_u64(), Some(6));
    let causes: Vec<&str> = of_type(&lines, "reset").iter().map(|r| r["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["app-abort"]);
}

#[test]
fn one_bad_file_does_not_stop_the_others() {
    let scratch = Scratch::new("mixed");
    let good = scratch.ladder_pcap("good.pcap");
    let missing = scratch.path("missing.pcap");
    let out = run(&[&missing, &good]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = lines(&out);
    assert_eq!(of_type(&lines, "reset").len(), 2);
    assert_eq!(lines.last().unwrap()["errors"].as_array().map(Vec::len), Some(1));
}

#[test]
fn an_unknown_link_type_is_counted_by_name() {
    let scratch = Scratch::new("linktype");
    let pcap = scratch.ladder_pcap("user.pcap");
    let mut bytes = std::fs::read(&pcap).unwrap();
    bytes[20..24].copy_from_slice(&147u32.to_le_bytes());
    std::fs::write(&pcap, &bytes).unwrap();
    let out = run(&[&pcap]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = lines(&out);
    let stats = lines.last().unwrap();
    assert_eq!(stats["skipped"]["unsupported-link-type USER (147)"].as_u64(), Some(7), "{stats}");
    assert_eq!(stats["tcp_packets"].as_u64(), Some(0));
}

#[test]
fn standard_input_and_text_output() {
    let scratch = Scratch::new("stdin");
    let pcap = scratch.ladder_pcap("in.pcap");
    let mut child = Command::new(agent().exe)
        .args(["--read", "-", "-o", "text"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    child.stdin.take().unwrap().write_all(&std::fs::read(&pcap).unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cause=refused") && text.contains("cause=app-abort"), "{text}");
    assert!(text.contains("REJ"), "flow lines carry conn_state: {text}");
}

/// Found by fuzzing: a pcapng interface whose `if_tsoffset` puts the packet ~300 years before
/// 1970 once overflowed the tracker's time arithmetic and crashed the agent.
#[test]
fn an_absurd_pcapng_time_offset_does_not_crash_the_agent() {
    const HEX: &str = "0a0d0d0a1c0000004d3c2b1a01000000ffffffffffffffff1c000000010000002400000065000000000000000e0008000043add5fdffffff000000002400000006000000480000000000000000000000010000002800000028000000450000280001000040060000c0000201c00002029c400050000003e800000000500403e80000000048000000";
    let bytes: Vec<u8> = (0..HEX.len()).step_by(2).map(|i| u8::from_str_radix(&HEX[i..i + 2], 16).unwrap()).collect();
    let scratch = Scratch::new("tsoffset");
    let pcapng = scratch.path("offset.pcapng");
    std::fs::write(&pcapng, bytes).unwrap();
    let out = run(&[&pcapng]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = lines(&out);
    assert_eq!(of_type(&lines, "reset").len(), 1);
}

/// Runs the agent on `capture` as agent `test` with its state in `scratch` and `args` (a
/// collector among them); `None` if it did not end within 60 s (it is killed then).
fn send(scratch: &Scratch, capture: &Path, args: &[&str]) -> Option<Output> {
    let child = Command::new(agent().exe)
        .arg("--read")
        .arg(capture)
        .args(["--name", "test"])
        .args(args)
        .arg("--state-dir")
        .arg(scratch.path("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agent");
    rstscope_tests::machine::wait_bounded(child, std::time::Duration::from_secs(60))
}

/// A named pipe (or `-r <(ssh host tcpdump -w -)`) is read once, from its start, also when the
/// agent sends to a collector: the hello's look at the first packet only opens regular files.
/// (No collector listens here; the run still reads everything, spools it and says so.)
#[test]
fn a_named_pipe_is_read_whole_with_a_collector() {
    let scratch = Scratch::new("fifo");
    let pcap = scratch.ladder_pcap("ladder.pcap");
    let fifo = scratch.path("capture.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    {
        let (pcap, fifo) = (pcap.clone(), fifo.clone());
        // Opening a pipe for writing blocks until the agent opens it for reading; the thread
        // is not joined, so a test that fails cannot hang on it.
        std::thread::spawn(move || {
            let bytes = std::fs::read(&pcap).expect("read pcap");
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo).and_then(|mut f| f.write_all(&bytes));
        });
    }
    // A peek at the pipe used to eat its start; the agent then waited for a writer for ever.
    let out = send(&scratch, &fifo, &["--collector", "http://127.0.0.1:1", "--ack-timeout", "1", "-o", "json"])
        .expect("the agent read the pipe and ended within 60 s");
    assert!(!stderr(&out).contains("not a pcap"), "{}", stderr(&out));
    let lines = lines(&out);
    assert_eq!(of_type(&lines, "reset").len(), 2, "{}", stderr(&out));
}

/// A collector address without a scheme is refused at once (exit 2), not retried as an outage
/// until the acknowledgement timeout.
#[test]
fn a_collector_address_without_a_scheme_is_a_usage_error() {
    let scratch = Scratch::new("bare-url");
    let pcap = scratch.ladder_pcap("ladder.pcap");
    let out = send(&scratch, &pcap, &["--collector", "127.0.0.1:1", "--ack-timeout", "300"])
        .expect("refused at once, not retried for 300 s");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("e.g. http://127.0.0.1:1"), "{}", stderr(&out));
}

/// `--max-flows 0` (no connection could be tracked) used to run silently as 1: it is refused
/// at once (exit 2), before anything is read.
#[test]
fn max_flows_zero_is_a_usage_error() {
    let scratch = Scratch::new("max-flows");
    let pcap = scratch.ladder_pcap("ladder.pcap");
    let out =
        Command::new(agent().exe).arg("--read").arg(&pcap).args(["--max-flows", "0", "-o", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out), "rstscope-agent: --max-flows must be at least 1\n");
    assert!(out.stdout.is_empty(), "nothing was read: {}", String::from_utf8_lossy(&out.stdout));
    let one =
        Command::new(agent().exe).arg("--read").arg(&pcap).args(["--max-flows", "1", "-o", "json"]).output().unwrap();
    assert!(one.status.success(), "{}", stderr(&one));
}
