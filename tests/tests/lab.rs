//! The network-namespace lab (issue 5): client — mbox (nftables middlebox) — r2 — server as
//! namespaces, live agents on the client, the mbox and the server streaming to a real collector
//! in its own namespace, real sockets making real resets, and `rstscope resets -o json` checked
//! for the exact verdict and cause of every RST of every scenario.
//!
//! Skips itself, saying so, when not root or without `ip netns`; under `CI=true` that is a
//! failure unless `RSTSCOPE_LAB=skip`. `RSTSCOPE_LAB_KEEP=1` keeps the scratch directory (agent
//! and collector logs).
//!
//! Until the collector correlates (every record `pending`, one record per agent sighting), the
//! test checks what the agents alone show: which vantage points saw each RST (both ends for a
//! genuine one, only the receiver for a forged one, only the sender for a lost one) and the
//! sender's local cause.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use rstscope_tests::lab::{self, addr, Binaries, Host, Lab, Proc};
use serde_json::Value;

/// Prints past libtest's output capture, so the skip notice and the scenario table reach the
/// log of a passing run too.
fn shout(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.write_all(b"\n");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// The RST claims to come from the server (its source port is the scenario's server port).
    Server,
    /// The RST claims to come from the client.
    Client,
}

impl Role {
    fn letter(self) -> &'static str {
        match self {
            Role::Server => "S",
            Role::Client => "C",
        }
    }
    fn sender_agent(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
    fn receiver_agent(self) -> &'static str {
        match self {
            Role::Server => "client",
            Role::Client => "server",
        }
    }
}

/// What one or more RSTs of a scenario must be.
#[derive(Clone, Debug)]
struct Expect {
    from: Role,
    /// Acceptable verdicts (more than one only where the contract allows, e.g. an agent down).
    verdicts: &'static [&'static str],
    cause: &'static str,
    both_directions: bool,
    min: usize,
    max: usize,
    /// The sender's agent's own cause where it differs from the merged one (checked only
    /// until the collector correlates). Each use is a known gap of the agent's single view.
    local_cause: Option<&'static str>,
}

fn one(from: Role, verdict: &'static [&'static str], cause: &'static str) -> Expect {
    Expect { from, verdicts: verdict, cause, both_directions: false, min: 1, max: 1, local_cause: None }
}

const E2E: &[&str] = &["end-to-end"];
const INJECTED: &[&str] = &["injected"];
const LOST: &[&str] = &["lost"];

impl Expect {
    fn describe(&self) -> String {
        let mut s = format!("{} {}/{}", self.from.letter(), self.verdicts.join("|"), self.cause);
        if self.both_directions {
            s += " both";
        }
        if (self.min, self.max) != (1, 1) {
            s += &format!(" x{}..{}", self.min, self.max);
        }
        s
    }
}

/// One RST packet as the CLI reports it, in either output generation.
#[derive(Clone, Debug)]
struct Got {
    from: Role,
    ts: f64,
    /// Contract mode: the merged report's verdict; local mode: "pending".
    verdict: String,
    /// Contract mode: the report's cause; local mode: the sender's agent's local cause, or "-".
    cause: String,
    both_directions: bool,
    /// Agents that saw it.
    agents: BTreeSet<String>,
    /// The raw records (evidence for reports).
    raw: Vec<Value>,
}

impl Got {
    fn describe(&self, contract: bool) -> String {
        if contract {
            let mut s = format!("{} {}/{}", self.from.letter(), self.verdict, self.cause);
            if self.both_directions {
                s += " both";
            }
            s
        } else {
            let agents: Vec<&str> = self.agents.iter().map(String::as_str).collect();
            format!("{} [{}] {}", self.from.letter(), agents.join("+"), self.cause)
        }
    }
}

fn port_of(endpoint: &str) -> Option<u16> {
    endpoint.rsplit(':').next()?.parse().ok()
}

/// Whether the collector already returns merged reports (the correlator, issue 4).
fn is_contract(records: &[Value]) -> bool {
    records.iter().any(|r| r.get("observations").is_some() || r.get("claimed_sender").is_some())
}

/// Groups the CLI's records into RST packets; `server_ports` tell who claims to send each.
fn parse_resets(records: &[Value], server_ports: &[u16]) -> (bool, Vec<Got>) {
    let records: Vec<&Value> = records.iter().filter(|r| r["type"] == "reset").collect();
    let contract = records.iter().any(|r| r.get("observations").is_some() || r.get("claimed_sender").is_some());
    let role_of = |endpoint: &str| {
        if port_of(endpoint).is_some_and(|p| server_ports.contains(&p)) {
            Role::Server
        } else {
            Role::Client
        }
    };
    let mut out = Vec::new();
    if contract {
        for r in records {
            let agents = r["observations"]
                .as_array()
                .map(|obs| obs.iter().filter_map(|o| o["agent"].as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            out.push(Got {
                from: role_of(r["claimed_sender"].as_str().unwrap_or("")),
                ts: r["ts"].as_f64().unwrap_or(0.0),
                verdict: r["verdict"].as_str().unwrap_or("?").to_string(),
                cause: r["cause"].as_str().unwrap_or("?").to_string(),
                both_directions: r["both_directions"].as_bool().unwrap_or(false),
                agents,
                raw: vec![r.clone()],
            });
        }
    } else {
        // One record per agent sighting: the same packet has the same seq, ack and flags at
        // every vantage point (also through the lab's NAT, which keeps sequence numbers).
        let mut groups: BTreeMap<(Role, u64, u64, String), Got> = BTreeMap::new();
        for r in records {
            let from = role_of(r["src"].as_str().unwrap_or(""));
            let key = (
                from,
                r["seq"].as_u64().unwrap_or(0),
                r["ack"].as_u64().unwrap_or(0),
                r["flags"].as_str().unwrap_or("").to_string(),
            );
            let agent = r["agent"].as_str().unwrap_or("?").to_string();
            let entry = groups.entry(key).or_insert_with(|| Got {
                from,
                ts: f64::MAX,
                verdict: r["verdict"].as_str().unwrap_or("?").to_string(),
                cause: "-".into(),
                both_directions: false,
                agents: BTreeSet::new(),
                raw: Vec::new(),
            });
            entry.ts = entry.ts.min(r["ts"].as_f64().unwrap_or(f64::MAX));
            if agent == from.sender_agent() {
                entry.cause = r["cause"].as_str().unwrap_or("?").to_string();
            }
            entry.agents.insert(agent);
            entry.raw.push(r.clone());
        }
        out = groups.into_values().collect();
    }
    out.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    (contract, out)
}

/// Matches the RSTs against the expectations: each expectation takes, in time order, the RSTs
/// claimed by its role that follow the previous expectation of that role.
fn compare(expects: &[Expect], got: &[Got], contract: bool) -> Result<(), String> {
    let mut by_role: BTreeMap<Role, Vec<&Got>> = BTreeMap::new();
    for g in got {
        by_role.entry(g.from).or_default().push(g);
    }
    for role in [Role::Server, Role::Client] {
        let mut rsts = by_role.remove(&role).unwrap_or_default().into_iter().peekable();
        for e in expects.iter().filter(|e| e.from == role) {
            let mut n = 0;
            while n < e.max {
                let Some(g) = rsts.peek() else { break };
                if !matches(e, g, contract) {
                    break;
                }
                rsts.next();
                n += 1;
            }
            if n < e.min {
                let next = rsts.peek().map_or("nothing".to_string(), |g| g.describe(contract));
                return Err(format!("expected {} but got {n} such, then {next}", e.describe()));
            }
        }
        if let Some(extra) = rsts.next() {
            return Err(format!("unexpected RST {}", extra.describe(contract)));
        }
    }
    Ok(())
}

fn matches(e: &Expect, g: &Got, contract: bool) -> bool {
    if contract {
        return e.verdicts.contains(&g.verdict.as_str())
            && g.cause == e.cause
            && g.both_directions == e.both_directions;
    }
    // Local mode: the vantage points that saw it must fit the verdict; a genuine RST must carry
    // the expected cause at its sender.
    let sender = g.agents.contains(e.from.sender_agent());
    let receiver = g.agents.contains(e.from.receiver_agent());
    let cause_ok = g.cause == e.local_cause.unwrap_or(e.cause);
    let fits = |verdict: &str| match verdict {
        "end-to-end" => sender && receiver && cause_ok,
        "injected" => receiver && !sender,
        "lost" => sender && !receiver && cause_ok,
        "unverified" => (sender || receiver) && (!sender || cause_ok),
        _ => false,
    };
    e.verdicts.iter().any(|v| fits(v))
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

struct Row {
    name: String,
    expected: String,
    got: String,
    result: Result<(), String>,
}

struct Run {
    lab: Lab,
    collector: Option<Proc>,
    agents: BTreeMap<&'static str, Proc>,
    rows: Vec<Row>,
    contract_seen: bool,
}

const AGENTS: [(&str, Host, &str); 3] =
    [("client", Host::Client, "c-m"), ("mbox", Host::Mbox, "m-c"), ("server", Host::Server, "s-r")];

impl Run {
    fn start_agent(&mut self, name: &'static str) -> Result<()> {
        let (_, host, ifname) = AGENTS.iter().find(|(n, _, _)| *n == name).expect("known agent");
        let proc = self.lab.start_agent(*host, ifname, name)?;
        self.agents.insert(name, proc);
        Ok(())
    }

    fn query(&self, ports: &[u16], since: f64) -> Result<Vec<Value>> {
        let since = format!("{since:.3}");
        let mut args = vec!["resets", "-o", "json", "--since", since.as_str()];
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        for p in &ports {
            args.extend(["--port", p.as_str()]);
        }
        self.lab.cli(&args)
    }

    /// Waits (bounded) until the scenario's RSTs are all decided (no `pending` in contract mode;
    /// seen by the expected vantage points in local mode) and match, then records the row.
    fn check(&mut self, name: &str, server_ports: &[u16], since: f64, expects: &[Expect]) {
        let expected = if expects.is_empty() {
            "no RST".to_string()
        } else {
            expects.iter().map(Expect::describe).collect::<Vec<_>>().join("; ")
        };
        let deadline = Instant::now() + Duration::from_secs(45);
        let min_total: usize = expects.iter().map(|e| e.min).sum();
        let mut last = (false, Vec::new(), Err("no answer from the collector".to_string()));
        loop {
            match self.query(server_ports, since - 1.0) {
                Ok(records) => {
                    let (contract, got) = parse_resets(&records, server_ports);
                    self.contract_seen |= contract;
                    let pending = contract && got.iter().any(|g| g.verdict == "pending");
                    let result =
                        if pending { Err("still pending".to_string()) } else { compare(expects, &got, contract) };
                    let settled = !pending && got.len() >= min_total;
                    let done = settled && result.is_ok();
                    last = (contract, got, result);
                    if done {
                        // Anything late (a RST still settling at some agent) shows up now.
                        std::thread::sleep(Duration::from_millis(2500));
                        if let Ok(records) = self.query(server_ports, since - 1.0) {
                            let (contract, got) = parse_resets(&records, server_ports);
                            let result = compare(expects, &got, contract);
                            last = (contract, got, result);
                        }
                        break;
                    }
                }
                Err(e) => last.2 = Err(format!("query failed: {e:#}")),
            }
            if Instant::now() > deadline {
                let why = last.2.clone().err().unwrap_or_default();
                last.2 = Err(format!("not settled within 45 s: {why}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let (contract, got, result) = last;
        let got_text = if got.is_empty() {
            "no RST".to_string()
        } else {
            got.iter().map(|g| g.describe(contract)).collect::<Vec<_>>().join("; ")
        };
        if result.is_err() {
            let evidence: Vec<String> = got.iter().flat_map(|g| g.raw.iter().map(Value::to_string)).collect();
            shout(&format!("lab: scenario {name} failed; the collector's records:\n{}", evidence.join("\n")));
        }
        self.rows.push(Row { name: name.to_string(), expected, got: got_text, result });
    }

    fn table(&self) -> String {
        let w0 = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(8).max(8);
        let w1 = self.rows.iter().map(|r| r.expected.len()).max().unwrap_or(8).max(8);
        let w2 = self.rows.iter().map(|r| r.got.len()).max().unwrap_or(3).max(3);
        let mode = if self.contract_seen { "verdicts (contract)" } else { "agents' local view (no correlator yet)" };
        let mut out = format!("lab scenarios, checked against {mode}\n");
        out += &format!("{:w0$}  {:w1$}  {:w2$}  result\n", "scenario", "expected", "got");
        for r in &self.rows {
            let result = match &r.result {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAIL: {e}"),
            };
            out += &format!("{:w0$}  {:w1$}  {:w2$}  {result}\n", r.name, r.expected, r.got);
        }
        out
    }
}

fn sock(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

const SHORT: Duration = Duration::from_secs(5);
const LONG: Duration = Duration::from_secs(20);

fn serve(lab: &Lab, ip: &str, port: u16, mode: &str, extra: &[&str]) -> Result<Proc> {
    let listen = sock(ip, port);
    let mut args = vec!["serve", "--listen", listen.as_str(), "--mode", mode];
    args.extend_from_slice(extra);
    let mut proc = lab.labhost(Host::Server, &args)?;
    proc.expect_line("listening", SHORT)?;
    Ok(proc)
}

fn client(lab: &Lab, args: &[&str]) -> Result<String> {
    let proc = lab.labhost(Host::Client, args)?;
    let (status, lines) = proc.finish(LONG)?;
    if !status.success() {
        bail!("labhost {args:?} failed: {status} {lines:?}");
    }
    Ok(lines.join(" "))
}

fn connect(lab: &Lab, ip: &str, port: u16, extra: &[&str]) -> Result<String> {
    let to = sock(ip, port);
    let mut args = vec!["connect", "--to", to.as_str()];
    args.extend_from_slice(extra);
    client(lab, &args)
}

/// Scenario runners: each makes its traffic and returns what the programs said.
mod scenario {
    use super::*;

    pub fn refused(lab: &Lab, ip: &str, port: u16) -> Result<String> {
        connect(lab, ip, port, &[])
    }

    pub fn abort(lab: &Lab, ip: &str, port: u16) -> Result<String> {
        let server = serve(lab, ip, port, "abort", &[])?;
        let said = connect(lab, ip, port, &["--send", "GET /abort\n"])?;
        let (_, s) = server.finish(LONG)?;
        Ok(format!("{said} / {}", s.join(" ")))
    }

    pub fn unread_close(lab: &Lab, ip: &str, port: u16) -> Result<String> {
        let server = serve(lab, ip, port, "unread-close", &[])?;
        let said = connect(lab, ip, port, &["--send", "a request the server never reads\n"])?;
        let (_, s) = server.finish(LONG)?;
        Ok(format!("{said} / {}", s.join(" ")))
    }

    pub fn held(lab: &Lab, ip: &str, port: u16, send: Option<&str>, idle_ms: &str) -> Result<String> {
        let server = serve(lab, ip, port, "hold", &["--idle-ms", idle_ms])?;
        let said = match send {
            Some(text) => connect(lab, ip, port, &["--send", text])?,
            None => connect(lab, ip, port, &[])?,
        };
        let (_, s) = server.finish(LONG)?;
        Ok(format!("{said} / {}", s.join(" ")))
    }

    pub fn forge(lab: &Lab, ip: &str, port: u16) -> Result<String> {
        let next_hop = lab.mac(Host::R2, "r-m")?;
        let port_text = port.to_string();
        let mut forger = lab.labhost(
            Host::Mbox,
            &[
                "forge-rst",
                "--client-if",
                "m-c",
                "--server-if",
                "m-r",
                "--next-hop-mac",
                &next_hop,
                "--port",
                &port_text,
            ],
        )?;
        forger.expect_line("sniffing", SHORT)?;
        let said = held(lab, ip, port, None, "5000")?;
        let (_, f) = forger.finish(LONG)?;
        Ok(format!("{said} / {}", f.join(" ")))
    }

    pub fn stuck(lab: &Lab, ip: &str, port: u16) -> Result<String> {
        let server = serve(lab, ip, port, "hold", &["--idle-ms", "6000"])?;
        let to = sock(ip, port);
        let said = client(lab, &["stuck", "--to", &to, "--abort-after-ms", "2000"])?;
        let (_, s) = server.finish(LONG)?;
        Ok(format!("{said} / {}", s.join(" ")))
    }

    pub fn race(lab: &Lab, ip: &str, keep: u16, cancel: u16) -> Result<String> {
        let kept = serve(lab, ip, keep, "clean", &[])?;
        // A listener on the cancelled port too: its SYN-ACK is what the client resets.
        let other = serve(lab, ip, cancel, "clean", &["--timeout-secs", "3"])?;
        let to = sock(ip, keep);
        let said = client(lab, &["race-syns", "--keep", &to, "--cancel-port", &cancel.to_string()])?;
        kept.finish(LONG)?;
        other.finish(LONG)?;
        Ok(said)
    }

    pub fn many(lab: &Lab, ip: &str, port: u16, n: usize) -> Result<String> {
        let n_text = n.to_string();
        let server = serve(lab, ip, port, "clean", &["--count", &n_text])?;
        let to = sock(ip, port);
        let said = client(lab, &["many-clean", "--to", &to, "--n", &n_text])?;
        server.finish(LONG)?;
        Ok(said)
    }
}

/// The nftables ruleset of the mbox for all scenarios: each rule applies to its own ports.
fn ruleset() -> String {
    let reject_ports = format!("{{ {}, {} }}", P_REJECT, P_REJECT + 100);
    let keyword = "0x474554202f626c6f"; // "GET /blo"
    format!(
        "table inet lab {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    tcp dport {reject_ports} tcp flags syn reject with tcp reset
    tcp dport {{ {kw}, {kw6} }} @ih,0,64 {keyword} reject with tcp reset
    tcp sport {{ {lost}, {lost6} }} tcp flags rst drop
    tcp sport {{ {stuck}, {stuck6} }} tcp flags & (syn | rst) == 0 drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"m-r\" tcp dport {nat} masquerade
  }}
}}
",
        kw = P_KEYWORD,
        kw6 = P_KEYWORD + 100,
        lost = P_LOST,
        lost6 = P_LOST + 100,
        stuck = P_STUCK,
        stuck6 = P_STUCK + 100,
        nat = P_NAT,
    )
}

// Server ports, one per scenario (IPv6 variants at +100).
const P_PROBE: u16 = 7000;
const P_REFUSED: u16 = 7001;
const P_ABORT: u16 = 7002;
const P_UNREAD: u16 = 7003;
const P_REJECT: u16 = 7004;
const P_KEYWORD: u16 = 7005;
const P_LOST: u16 = 7006;
const P_FORGE: u16 = 7007;
const P_NAT: u16 = 7008;
const P_RACE_KEEP: u16 = 7009;
const P_RACE_CANCEL: u16 = 7010;
const P_STUCK: u16 = 7011;
const P_MANY: u16 = 7012;
const P_COLLECTOR_DOWN_REFUSED: u16 = 7013;
const P_COLLECTOR_DOWN_ABORT: u16 = 7014;
const P_AGENT_DOWN: u16 = 7015;
const P_AGENT_PAUSED: u16 = 7016;

fn lab_binaries() -> Binaries {
    Binaries::locate_or_build(PathBuf::from(env!("CARGO_BIN_EXE_labhost")))
}

/// `Some(reason)` when the lab must be skipped here.
fn skip_reason() -> Option<String> {
    if std::env::var("RSTSCOPE_LAB").as_deref() == Ok("skip") {
        return Some("RSTSCOPE_LAB=skip".into());
    }
    let Err(why) = lab::preflight() else { return None };
    let why = format!("{why:#}");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "the netns lab cannot run in CI: {why}. Fix the runner, or set RSTSCOPE_LAB=skip to skip it on purpose."
        );
    }
    Some(why)
}

#[test]
fn netns_lab_every_rst_gets_its_exact_verdict_and_cause() {
    if let Some(why) = skip_reason() {
        shout(&format!("SKIPPED netns lab (tests/tests/lab.rs): {why}"));
        return;
    }
    let started = Instant::now();
    let bins = lab_binaries();
    let lab = Lab::new(bins).expect("build the lab topology");
    lab.nft(&ruleset()).expect("load the mbox's nftables rules");
    let collector = lab.start_collector().expect("start the collector");
    let mut run =
        Run { lab, collector: Some(collector), agents: BTreeMap::new(), rows: Vec::new(), contract_seen: false };
    for (name, _, _) in AGENTS {
        run.start_agent(name).expect("start agent");
    }
    run.lab.wait_agents_connected(&["client", "mbox", "server"], Duration::from_secs(30)).expect("agents connect");
    // Warm-up: a refused connection every agent must see, so every capture is live.
    let deadline = Instant::now() + Duration::from_secs(30);
    let since = epoch_now();
    loop {
        scenario::refused(&run.lab, addr::SERVER4, P_PROBE).expect("probe");
        std::thread::sleep(Duration::from_millis(1500));
        let records = match run.query(&[P_PROBE], since - 1.0) {
            Ok(records) => records,
            Err(e) => {
                eprintln!("lab: probe query: {e:#}");
                Vec::new()
            }
        };
        let (_, got) = parse_resets(&records, &[P_PROBE]);
        let seen: BTreeSet<String> = got.iter().flat_map(|g| g.agents.iter().cloned()).collect();
        if is_contract(&records) || ["client", "mbox", "server"].iter().all(|a| seen.contains(*a)) {
            break;
        }
        assert!(Instant::now() < deadline, "the agents did not all report the probe within 30 s: {records:?}");
    }

    type Runner = Box<dyn Fn(&Lab) -> Result<String>>;
    let v4 = addr::SERVER4;
    let v6 = addr::SERVER6;
    let both = |from| Expect { both_directions: true, ..one(from, INJECTED, "middlebox") };
    let plain: Vec<(&str, Vec<u16>, Runner, Vec<Expect>)> = vec![
        (
            "refused v4",
            vec![P_REFUSED],
            Box::new(move |l| scenario::refused(l, v4, P_REFUSED)),
            vec![one(Role::Server, E2E, "refused")],
        ),
        (
            "refused v6",
            vec![P_REFUSED + 100],
            Box::new(move |l| scenario::refused(l, v6, P_REFUSED + 100)),
            vec![one(Role::Server, E2E, "refused")],
        ),
        (
            "so-linger-0 abort v4",
            vec![P_ABORT],
            Box::new(move |l| scenario::abort(l, v4, P_ABORT)),
            vec![one(Role::Server, E2E, "app-abort")],
        ),
        (
            "so-linger-0 abort v6",
            vec![P_ABORT + 100],
            Box::new(move |l| scenario::abort(l, v6, P_ABORT + 100)),
            vec![one(Role::Server, E2E, "app-abort")],
        ),
        (
            "close with unread data",
            vec![P_UNREAD],
            Box::new(move |l| scenario::unread_close(l, v4, P_UNREAD)),
            vec![one(Role::Server, E2E, "app-abort")],
        ),
        (
            "nft reject port v4",
            vec![P_REJECT],
            Box::new(move |l| connect(l, v4, P_REJECT, &[])),
            vec![one(Role::Server, INJECTED, "middlebox")],
        ),
        (
            "nft reject port v6",
            vec![P_REJECT + 100],
            Box::new(move |l| connect(l, v6, P_REJECT + 100, &[])),
            vec![one(Role::Server, INJECTED, "middlebox")],
        ),
        (
            "nft keyword midstream",
            vec![P_KEYWORD],
            Box::new(move |l| scenario::held(l, v4, P_KEYWORD, Some("GET /blocked HTTP/1.0\n\n"), "1500")),
            // The server never hears of it; when it gives up and closes, the client's stack
            // answers the FIN with a genuine RST (no-connection: its socket is gone).
            vec![one(Role::Server, INJECTED, "middlebox"), one(Role::Client, E2E, "no-connection")],
        ),
        (
            "router drops server RST",
            vec![P_LOST],
            // The client's SYN and its retransmission one second later: two refusals, both lost.
            Box::new(move |l| connect(l, v4, P_LOST, &["--timeout-ms", "1500"])),
            vec![Expect { min: 1, max: 2, ..one(Role::Server, LOST, "refused") }],
        ),
        (
            "router forges both ways v4",
            vec![P_FORGE],
            Box::new(move |l| scenario::forge(l, v4, P_FORGE)),
            vec![both(Role::Server), both(Role::Client)],
        ),
        (
            "router forges both ways v6",
            vec![P_FORGE + 100],
            Box::new(move |l| scenario::forge(l, v6, P_FORGE + 100)),
            vec![both(Role::Server), both(Role::Client)],
        ),
        (
            "masquerade NAT, abort",
            vec![P_NAT],
            Box::new(move |l| scenario::abort(l, v4, P_NAT)),
            vec![one(Role::Server, E2E, "app-abort")],
        ),
        (
            "racing SYNs, one cancelled",
            vec![P_RACE_KEEP, P_RACE_CANCEL],
            Box::new(move |l| scenario::race(l, v4, P_RACE_KEEP, P_RACE_CANCEL)),
            vec![one(Role::Client, E2E, "duplicate-syn-cancel")],
        ),
        (
            "retransmissions, abort v4",
            vec![P_STUCK],
            Box::new(move |l| scenario::stuck(l, v4, P_STUCK)),
            vec![one(Role::Client, E2E, "retransmission-timeout")],
        ),
        (
            "retransmissions, abort v6",
            vec![P_STUCK + 100],
            Box::new(move |l| scenario::stuck(l, v6, P_STUCK + 100)),
            vec![one(Role::Client, E2E, "retransmission-timeout")],
        ),
        ("40 clean connections v4", vec![P_MANY], Box::new(move |l| scenario::many(l, v4, P_MANY, 40)), vec![]),
        (
            "20 clean connections v6",
            vec![P_MANY + 100],
            Box::new(move |l| scenario::many(l, v6, P_MANY + 100, 20)),
            vec![],
        ),
    ];
    let only = std::env::var("RSTSCOPE_LAB_ONLY").unwrap_or_default();
    for (name, ports, runner, expects) in plain {
        if !name.contains(only.as_str()) {
            continue;
        }
        let since = epoch_now();
        match runner(&run.lab) {
            Ok(said) => {
                eprintln!("lab: {name}: {said}");
                run.check(name, &ports, since, &expects);
            }
            Err(e) => run.rows.push(Row {
                name: name.into(),
                expected: String::new(),
                got: String::new(),
                result: Err(format!("traffic failed: {e:#}")),
            }),
        }
    }

    // Robustness 1: the collector is killed (SIGKILL) during a scenario and restarted; the
    // agents' spools deliver everything afterwards.
    {
        let since = epoch_now();
        run.collector.take().expect("collector running").kill();
        let said1 = scenario::refused(&run.lab, v4, P_COLLECTOR_DOWN_REFUSED);
        let said2 = scenario::abort(&run.lab, v4, P_COLLECTOR_DOWN_ABORT);
        eprintln!("lab: collector down: {said1:?} {said2:?}");
        std::thread::sleep(Duration::from_secs(1));
        run.collector = Some(run.lab.start_collector().expect("restart the collector"));
        run.check(
            "collector kill -9 mid-scenario",
            &[P_COLLECTOR_DOWN_REFUSED, P_COLLECTOR_DOWN_ABORT],
            since,
            &[one(Role::Server, E2E, "refused"), one(Role::Server, E2E, "app-abort")],
        );
    }

    // Robustness 2: the server's agent is killed, a RST happens, the agent comes back; only the
    // client saw it: `unverified` (never injected), or complete if the correlator can tell.
    {
        let since = epoch_now();
        run.agents.remove("server").expect("server agent").kill();
        let said = scenario::refused(&run.lab, v4, P_AGENT_DOWN);
        eprintln!("lab: server agent down: {said:?}");
        std::thread::sleep(Duration::from_secs(1));
        run.start_agent("server").expect("restart the server agent");
        run.check(
            "server agent down",
            &[P_AGENT_DOWN],
            since,
            &[one(Role::Server, &["unverified", "end-to-end"], "refused")],
        );
    }

    // Robustness 3: the client's agent is paused (SIGSTOP) for three seconds around a RST; the
    // kernel buffers its packets, so the verdict must be complete once it resumes.
    {
        let since = epoch_now();
        let client_agent = run.agents.get("client").expect("client agent");
        client_agent.signal("STOP");
        let said = scenario::abort(&run.lab, v4, P_AGENT_PAUSED);
        std::thread::sleep(Duration::from_secs(3));
        run.agents.get("client").expect("client agent").signal("CONT");
        eprintln!("lab: client agent paused: {said:?}");
        run.check("client agent paused 3 s", &[P_AGENT_PAUSED], since, &[one(Role::Server, E2E, "app-abort")]);
    }

    let table = run.table();
    shout(&format!("{table}(lab took {:.0} s)", started.elapsed().as_secs_f64()));
    if let Some(dir) = option_env!("CARGO_TARGET_TMPDIR") {
        let _ = std::fs::write(PathBuf::from(dir).join("lab-scenarios.txt"), &table);
    }
    let failed: Vec<&Row> = run.rows.iter().filter(|r| r.result.is_err()).collect();
    assert!(failed.is_empty(), "{} lab scenario(s) failed:\n{table}", failed.len());
}
