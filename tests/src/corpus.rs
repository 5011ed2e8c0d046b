//! Access to the shared capture corpus (`../shared/corpus`) for conformance tests.
//!
//! * [`Corpus`] finds the corpus and parses its `manifest.json`.
//! * [`Agent`] finds (or builds) the `rstscope-agent` binary and runs it on one capture.
//! * [`ZeekLog`] parses Zeek `conn.log` baselines, including `zeek-cut` outputs.
//! * [`TsharkRst`] parses the tshark RST truth (`tshark-truth/*.rst.tsv`).
//!
//! The captures are read where they are; nothing is copied into the project.
//!
//! Environment:
//! * `RSTSCOPE_CORPUS`: corpus folder (default `<workspace>/../shared/corpus`).
//! * `RSTSCOPE_SKIP_CORPUS=1`: let corpus tests pass when the corpus is absent (otherwise they fail).
//! * `RSTSCOPE_AGENT`: agent binary to use instead of `<target>/<profile>/rstscope-agent`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Corpus and manifest

/// The shared capture corpus.
pub struct Corpus {
    /// Folder holding `manifest.json`.
    pub root: PathBuf,
}

impl Corpus {
    /// Where the corpus is expected: `$RSTSCOPE_CORPUS`, else `<workspace>/../shared/corpus`.
    pub fn default_root() -> PathBuf {
        match std::env::var_os("RSTSCOPE_CORPUS") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"),
        }
    }

    /// The corpus, or `None` when it is absent and `RSTSCOPE_SKIP_CORPUS=1`.
    ///
    /// Panics with an explanation when it is absent otherwise: a conformance test that silently
    /// passes without its data proves nothing.
    pub fn require() -> Option<Corpus> {
        let root = Corpus::default_root();
        if root.join("manifest.json").is_file() {
            return Some(Corpus { root });
        }
        if std::env::var("RSTSCOPE_SKIP_CORPUS").as_deref() == Ok("1") {
            eprintln!("corpus not found at {} (RSTSCOPE_SKIP_CORPUS=1): skipping", root.display());
            return None;
        }
        panic!(
            "capture corpus not found: {} has no manifest.json. Put the corpus there, point \
             RSTSCOPE_CORPUS at it, or set RSTSCOPE_SKIP_CORPUS=1 to skip corpus tests.",
            root.display()
        );
    }

    /// Parses `manifest.json`.
    pub fn manifest(&self) -> Vec<Capture> {
        let path = self.root.join("manifest.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad {}: {e}", path.display()))
    }

    /// A corpus-relative path made absolute.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// One capture of the manifest.
#[derive(Deserialize, Debug, Clone)]
pub struct Capture {
    /// Corpus-relative path of the capture.
    pub file: String,
    /// Ground truths available for it.
    #[serde(default)]
    pub truth: Vec<Truth>,
    /// What tshark says about it.
    pub stats: CaptureStats,
}

/// One ground truth of a capture.
#[derive(Deserialize, Debug, Clone)]
pub struct Truth {
    /// `zeek-conn`, `zeek-history-state`, `suricata-test.yaml`, ...
    pub kind: String,
    /// Corpus-relative path of the truth file.
    pub file: String,
    /// For Zeek truths: the btest command lines that produced the baseline.
    #[serde(default)]
    pub exec: Vec<String>,
}

/// tshark's statistics of a capture, from the manifest.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct CaptureStats {
    /// Interface link types, e.g. `Ethernet (1 - ether)`.
    #[serde(default)]
    pub iface_encaps: Vec<String>,
    /// Protocol stacks of the TCP packets and how many packets have each.
    #[serde(default)]
    pub tcp_stacks: BTreeMap<String, u64>,
    /// Set when tshark needed `decode-as` Teredo for this capture.
    #[serde(default, rename = "_teredo")]
    pub teredo: bool,
}

impl CaptureStats {
    /// The TCP stacks that run inside a tunnel.
    pub fn tunnel_stacks(&self) -> Vec<&str> {
        self.tcp_stacks.keys().map(String::as_str).filter(|s| is_tunnel_stack(s)).collect()
    }

    /// Whether any TCP of this capture runs inside a tunnel.
    pub fn has_tunnels(&self) -> bool {
        self.teredo || !self.tunnel_stacks().is_empty()
    }
}

/// Whether a tshark protocol stack (`eth:ethertype:ip:gre:ip:tcp`) carries TCP inside a tunnel:
/// a tunnel protocol appears, or there is more than one IP layer.
pub fn is_tunnel_stack(stack: &str) -> bool {
    const TUNNELS: &[&str] = &["gre", "erspan", "teredo", "vxlan", "geneve", "ayiya", "gtp", "udp", "l2tp", "ipip"];
    let layers: Vec<&str> = stack.split(':').collect();
    let ip_layers = layers.iter().filter(|l| matches!(**l, "ip" | "ipv6")).count();
    ip_layers > 1 || layers.iter().any(|l| TUNNELS.contains(l))
}

/// Whether a tshark protocol stack carries TCP inside a tunnel the agent does not decode. It
/// decodes IP in IP, GRE carrying IP or Ethernet, ERSPAN, VXLAN and Geneve (`wire::decapsulate`);
/// Teredo, AYIYA, GTP, L2TP and PPTP's PPP stay skipped.
pub fn is_undecoded_tunnel_stack(stack: &str) -> bool {
    if !is_tunnel_stack(stack) {
        return false;
    }
    let layers: Vec<&str> = stack.split(':').collect();
    layers.iter().enumerate().any(|(i, layer)| match *layer {
        // UDP only as the carrier of VXLAN or Geneve.
        "udp" => !matches!(layers.get(i + 1), Some(&"vxlan") | Some(&"geneve")),
        "teredo" | "ayiya" | "gtp" | "l2tp" | "ppp" => true,
        _ => false,
    })
}

/// Decides whether the Zeek run that produced a baseline used `-C` (ignore checksums), or
/// `ignore_checksums_nets` (the same for the nets it names).
///
/// `exec` is the btest command list. The baseline is what the last `btest-diff`/`btest-diff-cut`
/// compares; the Zeek command producing it is the one naming that file (`&& mv conn.log X`),
/// else the last Zeek command.
pub fn zeek_ignored_checksums(exec: &[String]) -> bool {
    let target = exec
        .iter()
        .rev()
        .find(|l| l.contains("btest-diff"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("conn.log");
    let zeek_lines: Vec<&String> = exec.iter().filter(|l| invokes_zeek(l)).collect();
    let line = zeek_lines.iter().find(|l| target != "conn.log" && l.contains(target)).or(zeek_lines.last());
    let Some(line) = line else { return false };
    line.contains("ignore_checksums")
        || line.split_whitespace().any(|t| t.starts_with('-') && !t.starts_with("--") && t.contains('C'))
}

fn invokes_zeek(line: &str) -> bool {
    line.split(|c: char| c.is_whitespace() || c == '|' || c == '&' || c == ';').any(|t| t == "zeek")
}

/// Columns named by the `zeek-cut`/`btest-diff-cut` of a btest (for baselines without a header
/// line). `None` when there is no such command or it uses `-n` (negation).
pub fn zeek_cut_columns(exec: &[String]) -> Option<Vec<String>> {
    for line in exec.iter().rev() {
        let mut tokens = line.split_whitespace();
        if !tokens.any(|t| t == "zeek-cut" || t == "btest-diff-cut") {
            continue;
        }
        let mut cols = Vec::new();
        for t in tokens {
            if matches!(t, "<" | ">" | "|" | ">>" | "&&") || t.starts_with('<') || t.starts_with('>') {
                break;
            }
            if t.starts_with('-') {
                if t.contains('n') {
                    return None;
                }
                continue;
            }
            cols.push(t.to_string());
        }
        // btest-diff-cut's last argument is the log file.
        if line.contains("btest-diff-cut") {
            cols.pop();
        }
        return Some(cols);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Zeek logs

/// A parsed Zeek log (ASCII, or a `zeek-cut` extract of one).
#[derive(Debug, Clone)]
pub struct ZeekLog {
    /// Column names, canonical (`src_ip` renamed back to `id.orig_h` etc.).
    pub columns: Vec<String>,
    /// Data rows.
    pub rows: Vec<ZeekRow>,
}

/// One row of a Zeek log.
#[derive(Debug, Clone)]
pub struct ZeekRow {
    /// 1-based line number in the log file.
    pub line: usize,
    /// Column name to value; unset (`-`) and empty (`(empty)`) values are left out.
    pub fields: BTreeMap<String, String>,
}

impl ZeekLog {
    /// Parses a log. `#fields` names the columns; without it, a first line of plain names is the
    /// header (`zeek-cut -m`), else `fallback_columns` (from the `zeek-cut` command) apply.
    pub fn parse(text: &str, fallback_columns: Option<Vec<String>>) -> ZeekLog {
        let mut columns: Option<Vec<String>> = None;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            if let Some(fields) = line.strip_prefix("#fields") {
                columns = Some(fields.trim_start_matches('\t').split('\t').map(canonical_column).collect());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let cells: Vec<&str> = line.split('\t').collect();
            if columns.is_none() {
                let is_header =
                    cells.iter().all(|c| c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_' || ch == '.'));
                if is_header {
                    columns = Some(cells.iter().map(|c| canonical_column(c)).collect());
                    continue;
                }
                columns =
                    Some(fallback_columns.clone().unwrap_or_default().iter().map(|c| canonical_column(c)).collect());
            }
            let cols = columns.as_ref().expect("columns set above");
            let mut fields = BTreeMap::new();
            for (name, value) in cols.iter().zip(&cells) {
                if name.is_empty() || matches!(*value, "-" | "(empty)" | "") {
                    continue;
                }
                fields.insert(name.clone(), value.to_string());
            }
            rows.push(ZeekRow { line: i + 1, fields });
        }
        ZeekLog { columns: columns.unwrap_or_default(), rows }
    }

    /// Whether the log has this (canonical) column.
    pub fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column)
    }
}

fn canonical_column(name: &str) -> String {
    match name {
        "src_ip" => "id.orig_h",
        "src_port" => "id.orig_p",
        "dst_ip" => "id.resp_h",
        "dst_port" => "id.resp_p",
        other => other,
    }
    .to_string()
}

impl ZeekRow {
    /// A field's value, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// A numeric field.
    pub fn num(&self, name: &str) -> Option<u64> {
        self.get(name)?.parse().ok()
    }

    /// The (possibly partial) connection key of this row.
    pub fn key(&self) -> PartialKey {
        PartialKey {
            orig_h: self.get("id.orig_h").and_then(|s| s.parse().ok()),
            orig_p: self.get("id.orig_p").and_then(|s| s.parse().ok()),
            resp_h: self.get("id.resp_h").and_then(|s| s.parse().ok()),
            resp_p: self.get("id.resp_p").and_then(|s| s.parse().ok()),
        }
    }

    /// Start time when the baseline has it unmasked.
    pub fn ts(&self) -> Option<Nanos> {
        self.get("ts").and_then(Nanos::parse)
    }
}

/// A connection key of which some parts may be unknown (`zeek-cut` extracts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartialKey {
    /// Originator address.
    pub orig_h: Option<IpAddr>,
    /// Originator port.
    pub orig_p: Option<u16>,
    /// Responder address.
    pub resp_h: Option<IpAddr>,
    /// Responder port.
    pub resp_p: Option<u16>,
}

impl PartialKey {
    /// All four parts known.
    pub fn is_complete(&self) -> bool {
        self.orig_h.is_some() && self.orig_p.is_some() && self.resp_h.is_some() && self.resp_p.is_some()
    }

    /// No part known.
    pub fn is_empty(&self) -> bool {
        *self == PartialKey::default()
    }

    /// The key with originator and responder swapped.
    pub fn flipped(&self) -> PartialKey {
        PartialKey { orig_h: self.resp_h, orig_p: self.resp_p, resp_h: self.orig_h, resp_p: self.orig_p }
    }

    /// Whether a full key agrees with every known part.
    pub fn matches(&self, k: &FlowKey4) -> bool {
        fits(self.orig_h, k.orig.ip())
            && fits(self.orig_p, k.orig.port())
            && fits(self.resp_h, k.resp.ip())
            && fits(self.resp_p, k.resp.port())
    }
}

/// An unknown part fits anything.
fn fits<T: PartialEq>(want: Option<T>, have: T) -> bool {
    match want {
        None => true,
        Some(w) => w == have,
    }
}

impl fmt::Display for PartialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "(no key columns)");
        }
        let h = |h: Option<IpAddr>| h.map_or("?".to_string(), |h| h.to_string());
        let p = |p: Option<u16>| p.map_or("?".to_string(), |p| p.to_string());
        write!(f, "{} {} -> {} {}", h(self.orig_h), p(self.orig_p), h(self.resp_h), p(self.resp_p))
    }
}

/// A full connection key: originator and responder endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    /// Originator.
    pub orig: SocketAddr,
    /// Responder.
    pub resp: SocketAddr,
}

impl fmt::Display for FlowKey4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {} {}", self.orig.ip(), self.orig.port(), self.resp.ip(), self.resp.port())
    }
}

// ---------------------------------------------------------------------------------------------
// Time

/// An epoch time in nanoseconds, parsed exactly from its decimal text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub i128);

impl Nanos {
    /// Parses `1232039471.582211000` (any number of decimals up to 9; more must be zeros).
    /// `None` for masked (`XXXXXXXXXX.XXXXXX`) or malformed text.
    pub fn parse(text: &str) -> Option<Nanos> {
        let text = text.trim();
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (head, tail) = frac.split_at(frac.len().min(9));
        if tail.bytes().any(|b| b != b'0') {
            return None;
        }
        let mut nanos: i128 = if head.is_empty() { 0 } else { head.parse().ok()? };
        for _ in head.len()..9 {
            nanos *= 10;
        }
        Some(Nanos(int.parse::<i128>().ok()? * 1_000_000_000 + nanos))
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.0.div_euclid(1_000_000_000), self.0.rem_euclid(1_000_000_000))
    }
}

/// The exact text of a top-level number field in a JSON object line (serde_json would round it
/// through `f64`, which cannot hold nanoseconds since 1970).
pub fn raw_number_field(line: &str, name: &str) -> Option<String> {
    // Walk the top level of the object, skipping nested values and strings.
    let bytes = line.as_bytes();
    let mut depth = 0i32;
    let mut i = 0;
    let needle = format!("\"{name}\"");
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let s = &line[start..=i.min(bytes.len() - 1)];
                if depth == 1 && s == needle {
                    let rest = line[i + 1..].trim_start();
                    if let Some(rest) = rest.strip_prefix(':') {
                        let rest = rest.trim_start();
                        let end = rest
                            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
                            .unwrap_or(rest.len());
                        return (end > 0).then(|| rest[..end].to_string());
                    }
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The agent

/// The `rstscope-agent` binary.
pub struct Agent {
    /// Path of the executable.
    pub exe: PathBuf,
}

impl Agent {
    /// Finds the agent binary next to this test's target directory, building it with
    /// `cargo build -p rstscope-agent` (same profile) when it is missing or older than the
    /// agent's or proto's sources. `cargo test -p rstscope-tests` does not build another
    /// package's binaries, hence this. `RSTSCOPE_AGENT` overrides the path (no build then).
    pub fn locate_or_build() -> Agent {
        if let Some(exe) = std::env::var_os("RSTSCOPE_AGENT") {
            return Agent { exe: PathBuf::from(exe) };
        }
        let exe = workspace_binary("rstscope-agent", "rstscope-agent", &["agent", "proto"]);
        assert!(exe.is_file(), "agent binary not found at {}", exe.display());
        Agent { exe }
    }

    /// Runs `rstscope-agent --read FILE --output json [--ignore-checksums]`.
    pub fn run(&self, capture: &Path, ignore_checksums: bool) -> AgentRun {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--read").arg(capture).args(["--output", "json"]);
        if ignore_checksums {
            cmd.arg("--ignore-checksums");
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.exe.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut run = AgentRun {
            success: out.status.success(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            ..AgentRun::default()
        };
        for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    run.bad_lines.push(format!("{e}: {line}"));
                    continue;
                }
            };
            let parsed = match value.get("type").and_then(Value::as_str) {
                Some("reset") => AgentReset::from_json(line, &value).map(|r| run.resets.push(r)),
                Some("flow") => AgentFlow::from_json(line, &value).map(|f| run.flows.push(f)),
                Some("stats") => {
                    run.stats = Some(value.clone());
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = parsed {
                run.bad_lines.push(format!("{e}: {line}"));
            }
        }
        run.flows.sort_by_key(|f| f.ts);
        run
    }
}

/// A binary of another workspace package, next to the running test binary's target directory
/// (`<target>/<profile>/<bin>`), built with `cargo build -p PACKAGE --bin BIN` in the same
/// profile when it is missing or older than any file under the workspace folders `sources`.
/// `cargo test -p rstscope-tests` does not build other packages' binaries, hence this.
pub fn workspace_binary(package: &str, bin: &str, sources: &[&str]) -> PathBuf {
    // <target>/<profile>/deps/<test-binary>
    let test_exe = std::env::current_exe().expect("current_exe");
    let profile_dir =
        test_exe.parent().and_then(Path::parent).expect("test binary lives in <target>/<profile>/deps").to_path_buf();
    let exe = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest_source = sources.iter().filter_map(|d| newest_mtime(&workspace.join(d))).max();
    let built = std::fs::metadata(&exe).and_then(|m| m.modified()).ok();
    let stale = match (built, newest_source) {
        (None, _) => true,
        (Some(b), Some(s)) => s > b,
        (Some(_), None) => false,
    };
    if stale {
        let mut cmd = crate::build::cargo_build(&profile_dir, &["-p", package, "--bin", bin]);
        eprintln!("building {bin}: {cmd:?}");
        let status = cmd.status().expect("run cargo");
        assert!(status.success(), "`cargo build -p {package} --bin {bin}` failed ({status})");
    }
    exe
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// What one agent run printed.
#[derive(Debug, Default, Clone)]
pub struct AgentRun {
    /// Exit status was success.
    pub success: bool,
    /// Exit status, as text.
    pub status: String,
    /// Everything on stderr.
    pub stderr: String,
    /// Reset events.
    pub resets: Vec<AgentReset>,
    /// Flow summaries, by start time.
    pub flows: Vec<AgentFlow>,
    /// The final stats object.
    pub stats: Option<Value>,
    /// Lines that were not JSON or lacked required fields.
    pub bad_lines: Vec<String>,
}

impl AgentRun {
    /// The `skipped` reasons of the stats line.
    pub fn skipped(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Some(Value::Object(m)) = self.stats.as_ref().and_then(|s| s.get("skipped")) {
            for (k, v) in m {
                out.insert(k.clone(), v.as_u64().unwrap_or(0));
            }
        }
        out
    }

    /// Packets skipped because of an unsupported link type (`unsupported-link-type <name>`).
    pub fn unsupported_link_skips(&self) -> u64 {
        self.skipped().iter().filter(|(k, _)| k.starts_with("unsupported-link-type")).map(|(_, v)| v).sum()
    }

    /// A one-line summary of problems worth showing next to a disagreement.
    pub fn problems(&self) -> String {
        let mut p = Vec::new();
        if !self.success {
            p.push(format!("exit {}", self.status));
        }
        if self.stats.is_none() {
            p.push("no stats line".into());
        }
        if !self.bad_lines.is_empty() {
            p.push(format!("{} unparsable lines, first: {}", self.bad_lines.len(), self.bad_lines[0]));
        }
        let skipped = self.skipped();
        if !skipped.is_empty() {
            let list: Vec<String> = skipped.iter().map(|(k, v)| format!("{k}={v}")).collect();
            p.push(format!("agent skipped {}", list.join(" ")));
        }
        if let Some(first) = self.stderr.lines().next() {
            p.push(format!("stderr: {first}"));
        }
        p.join("; ")
    }
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value, String> {
    v.get(name).ok_or_else(|| format!("missing field {name:?}"))
}

fn str_field(v: &Value, name: &str) -> Result<String, String> {
    field(v, name)?.as_str().map(str::to_string).ok_or_else(|| format!("{name:?} is not a string"))
}

fn u64_field(v: &Value, name: &str) -> Result<u64, String> {
    field(v, name)?.as_u64().ok_or_else(|| format!("{name:?} is not an unsigned integer"))
}

fn ts_field(line: &str) -> Result<Nanos, String> {
    let raw = raw_number_field(line, "ts").ok_or("missing numeric field \"ts\"")?;
    Nanos::parse(&raw).ok_or_else(|| format!("bad ts {raw}"))
}

fn socket_field(v: &Value, name: &str) -> Result<SocketAddr, String> {
    let s = str_field(v, name)?;
    s.parse().map_err(|e| format!("{name:?} = {s:?}: {e}"))
}

/// A `{"type":"reset"}` line, the fields the tests compare.
#[derive(Debug, Clone)]
pub struct AgentReset {
    /// Capture time.
    pub ts: Nanos,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Raw sequence number.
    pub seq: u32,
    /// Raw acknowledgement number.
    pub ack: u32,
    /// Flag letters.
    pub flags: String,
    /// The agent's cause.
    pub cause: String,
}

impl AgentReset {
    fn from_json(line: &str, v: &Value) -> Result<AgentReset, String> {
        Ok(AgentReset {
            ts: ts_field(line)?,
            src: socket_field(v, "src")?,
            dst: socket_field(v, "dst")?,
            seq: u64_field(v, "seq")? as u32,
            ack: u64_field(v, "ack")? as u32,
            flags: str_field(v, "flags").unwrap_or_default(),
            cause: str_field(v, "cause").unwrap_or_default(),
        })
    }
}

/// A `{"type":"flow"}` line, the fields the tests compare.
#[derive(Debug, Clone)]
pub struct AgentFlow {
    /// Start time.
    pub ts: Nanos,
    /// Originator and responder.
    pub key: FlowKey4,
    /// Zeek conn_state.
    pub conn_state: String,
    /// Zeek history.
    pub history: String,
    /// Packet and payload byte counts (orig_pkts, resp_pkts, orig_bytes, resp_bytes).
    pub counts: BTreeMap<&'static str, u64>,
}

impl AgentFlow {
    fn from_json(line: &str, v: &Value) -> Result<AgentFlow, String> {
        let ip = |name: &str| -> Result<IpAddr, String> {
            let s = str_field(v, name)?;
            s.trim_matches(|c| c == '[' || c == ']').parse().map_err(|e| format!("{name:?} = {s:?}: {e}"))
        };
        let port = |name: &str| -> Result<u16, String> {
            u16::try_from(u64_field(v, name)?).map_err(|e| format!("{name:?}: {e}"))
        };
        let mut counts = BTreeMap::new();
        for name in ["orig_pkts", "resp_pkts", "orig_bytes", "resp_bytes"] {
            if let Some(n) = v.get(name).and_then(Value::as_u64) {
                counts.insert(name, n);
            }
        }
        Ok(AgentFlow {
            ts: ts_field(line)?,
            key: FlowKey4 {
                orig: SocketAddr::new(ip("orig_h")?, port("orig_p")?),
                resp: SocketAddr::new(ip("resp_h")?, port("resp_p")?),
            },
            conn_state: str_field(v, "conn_state")?,
            history: str_field(v, "history").unwrap_or_default(),
            counts,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// tshark RST truth

/// One row of a `tshark-truth/*.rst.tsv`.
#[derive(Debug, Clone)]
pub struct TsharkRst {
    /// Frame number in the capture.
    pub frame: u64,
    /// Capture time, exact.
    pub ts: Nanos,
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Raw sequence number.
    pub seq: u32,
    /// Raw acknowledgement number.
    pub ack: u32,
    /// The RST is quoted inside an ICMP error.
    pub in_icmp_error: bool,
    /// tshark's protocol stack (`eth:ethertype:ip:tcp`).
    pub encap: String,
}

impl TsharkRst {
    /// Parses a whole `.rst.tsv` (header line first).
    pub fn parse_tsv(text: &str) -> Result<Vec<TsharkRst>, String> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).ok_or_else(|| format!("no column {name}"));
        let (frame, time, ip_src, ip_dst, sport, dport, seq, ack, icmp, encap) = (
            col("frame")?,
            col("time_epoch")?,
            col("ip_src")?,
            col("ip_dst")?,
            col("tcp_srcport")?,
            col("tcp_dstport")?,
            col("seq_raw")?,
            col("ack_raw")?,
            col("in_icmp_error")?,
            col("encap")?,
        );
        let mut out = Vec::new();
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let cells: Vec<&str> = line.split('\t').collect();
            // Nested layers show as comma lists; the innermost comes last.
            let cell = |i: usize| -> Result<&str, String> {
                let c = cells.get(i).ok_or_else(|| format!("short line: {line}"))?;
                Ok(c.rsplit(',').next().unwrap_or(c).trim())
            };
            let num = |i: usize| -> Result<u64, String> {
                let c = cell(i)?;
                c.parse().map_err(|e| format!("{c:?}: {e} in {line}"))
            };
            let ip = |i: usize| -> Result<IpAddr, String> {
                let c = cell(i)?;
                c.parse().map_err(|e| format!("{c:?}: {e} in {line}"))
            };
            out.push(TsharkRst {
                frame: num(frame)?,
                ts: Nanos::parse(cell(time)?).ok_or_else(|| format!("bad time in {line}"))?,
                src: SocketAddr::new(ip(ip_src)?, num(sport)? as u16),
                dst: SocketAddr::new(ip(ip_dst)?, num(dport)? as u16),
                seq: num(seq)? as u32,
                ack: num(ack)? as u32,
                in_icmp_error: cell(icmp)? != "0",
                encap: cells.get(encap).unwrap_or(&"").to_string(),
            });
        }
        Ok(out)
    }
}

/// Maps a tshark truth file name back to its capture: `zeek__tcp__x.pcap.rst.tsv` is
/// `zeek/tcp/x.pcap`.
pub fn capture_of_truth_name(name: &str, suffix: &str) -> Option<String> {
    Some(name.strip_suffix(suffix)?.replace("__", "/"))
}

// ---------------------------------------------------------------------------------------------
// Running many captures

/// Maps `f` over `items` on a few threads (the machine's parallelism, at most 4); results keep
/// the order of `items`.
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                results.lock().expect("no poisoned lock")[i] = Some(r);
            });
        }
    });
    results.into_inner().expect("no poisoned lock").into_iter().map(|r| r.expect("every item ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_parse_exactly() {
        assert_eq!(Nanos::parse("1232039471.582211000"), Some(Nanos(1_232_039_471_582_211_000)));
        assert_eq!(Nanos::parse("1232039471.582211"), Some(Nanos(1_232_039_471_582_211_000)));
        assert_eq!(Nanos::parse("1.5"), Some(Nanos(1_500_000_000)));
        assert_eq!(Nanos::parse("XXXXXXXXXX.XXXXXX"), None);
        assert_eq!(Nanos(1_232_039_471_000_000_001).to_string(), "1232039471.000000001");
    }

    #[test]
    fn raw_number_field_reads_top_level_only() {
        let line = r#"{"type":"reset","evidence":[{"ts":1.0}],"ts": 1232039471.582211000,"x":"\"ts\""}"#;
        assert_eq!(raw_number_field(line, "ts").as_deref(), Some("1232039471.582211000"));
        assert_eq!(raw_number_field(r#"{"a":1}"#, "ts"), None);
    }

    #[test]
    fn checksum_flag_from_exec() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(zeek_ignored_checksums(&e(&["zeek -b -Cr $TRACES/x.pcap %INPUT", "btest-diff conn.log"])));
        assert!(!zeek_ignored_checksums(&e(&[
            "zeek -b -r x.pcap",
            "zeek-cut -Cn a < conn.log",
            "btest-diff conn.log"
        ])));
        assert!(zeek_ignored_checksums(&e(&[
            "zeek -r x \"ignore_checksums_nets += {1.0.0.0/8}\" %INPUT && mv conn.log conn-w.log",
            "zeek -r x %INPUT && mv conn.log conn-failed.log",
            "btest-diff conn-w.log",
        ])));
    }

    #[test]
    fn zeek_cut_columns_from_exec() {
        let e = vec!["zeek-cut id.orig_h id.orig_p proto < conn.log > conn.log.cut".to_string()];
        assert_eq!(zeek_cut_columns(&e).unwrap(), ["id.orig_h", "id.orig_p", "proto"]);
        let e = vec!["btest-diff-cut -m uid history conn.log".to_string()];
        assert_eq!(zeek_cut_columns(&e).unwrap(), ["uid", "history"]);
    }

    #[test]
    fn decoded_tunnel_stacks() {
        assert!(!is_undecoded_tunnel_stack("eth:ethertype:ip:tcp"));
        assert!(!is_undecoded_tunnel_stack("eth:ethertype:ip:gre:erspan:eth:ethertype:ip:tcp"));
        assert!(!is_undecoded_tunnel_stack("eth:ethertype:ip:udp:vxlan:eth:ethertype:ip:tcp"));
        assert!(!is_undecoded_tunnel_stack("eth:ethertype:ipv6:ip:tcp"));
        assert!(is_undecoded_tunnel_stack("eth:ethertype:ip:udp:teredo:ipv6:tcp"));
        assert!(is_undecoded_tunnel_stack("eth:ethertype:ip:udp:gtp:ip:tcp"));
        assert!(is_undecoded_tunnel_stack("eth:ethertype:ip:gre:ppp:ip:tcp"));
    }

    #[test]
    fn tunnel_stacks() {
        assert!(!is_tunnel_stack("eth:ethertype:vlan:ethertype:ip:tcp"));
        assert!(!is_tunnel_stack("eth:ethertype:ipv6:ipv6.fraghdr:tcp"));
        assert!(is_tunnel_stack("eth:ethertype:ip:gre:ip:tcp"));
        assert!(is_tunnel_stack("eth:ethertype:ipv6:ip:tcp"));
        assert!(is_tunnel_stack("eth:ethertype:ip:udp:vxlan:eth:ethertype:ip:tcp"));
    }

    #[test]
    fn zeek_log_formats() {
        let log = ZeekLog::parse("### x\nuid\thistory\nC1\tShAF\nC2\t-\n", None);
        assert_eq!(log.columns, ["uid", "history"]);
        assert_eq!(log.rows[0].get("history"), Some("ShAF"));
        assert_eq!(log.rows[1].get("history"), None);
        let log = ZeekLog::parse("### x\n1.2.3.4\t5\n", Some(vec!["id.orig_h".into(), "id.orig_p".into()]));
        assert_eq!(log.rows[0].key().orig_p, Some(5));
        let log = ZeekLog::parse("#fields\tts\tsrc_ip\n#types\ttime\taddr\nX\t1.2.3.4\n", None);
        assert!(log.has("id.orig_h"));
    }
}
