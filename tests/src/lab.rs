//! The network-namespace lab: real hosts as Linux network namespaces, a real middlebox
//! (nftables), live agents and a real collector, used by `tests/tests/lab.rs` and by
//! `labhost record-demo`.
//!
//! ```text
//!  client ──────── mbox ──────── r2 ──────── server        path (captured)
//!  c-m             m-c  m-r      r-m  r-s    s-r
//!  198.51.100.2    .1   .65      .66  203.0.113.1  203.0.113.10
//!  2001:db8:1::2   ::1  2001:db8:2::1  ::2  2001:db8:3::1  2001:db8:3::10
//!     │             │                          │
//!     └─ c-o ── o-c ┴ m-o ── o-m     o-s ── s-o┘          obs links (never captured)
//!                    obs: the collector on 203.0.113.193/.197/.201
//! ```
//!
//! Every name starts with a per-run prefix (`rsl<pid>-`); the lab removes its namespaces and kills
//! its processes when dropped, when a test panics (drop runs while unwinding), and on SIGINT or
//! SIGTERM (a handler installed once). It never touches a namespace it did not create and never
//! adds a route to the root namespace: the test process reaches the collector only through
//! `ip netns exec`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Namespaces and process ids this process created, for the signal handler.
#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    pids: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { namespaces: Vec::new(), pids: Vec::new() });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Kills every registered process and deletes every registered namespace (SIGINT/SIGTERM path).
fn cleanup_everything() {
    let (pids, namespaces) = {
        let mut reg = registry();
        (std::mem::take(&mut reg.pids), std::mem::take(&mut reg.namespaces))
    };
    for pid in pids {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
    }
    for ns in namespaces {
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    }
}

fn install_signal_cleanup() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Fails only when another handler is set (e.g. a test harness feature); then drop still
        // cleans up on panic and normal exit.
        let _ = ctrlc::set_handler(|| {
            eprintln!("lab: interrupted; removing namespaces and killing lab processes");
            cleanup_everything();
            std::process::exit(130);
        });
    });
}

/// The programs the lab runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `rstscope-agent`.
    pub agent: PathBuf,
    /// `rstscope-collector`.
    pub collector: PathBuf,
    /// The `rstscope` CLI.
    pub cli: PathBuf,
    /// The `labhost` traffic helper.
    pub labhost: PathBuf,
}

impl Binaries {
    /// The agent (built if stale), the collector's binaries (built with cargo next to the agent,
    /// so a test never runs old collector code), and the given `labhost`.
    pub fn locate_or_build(labhost: PathBuf) -> Binaries {
        let agent = crate::corpus::Agent::locate_or_build().exe;
        let profile_dir = agent.parent().expect("agent in <target>/<profile>").to_path_buf();
        if std::env::var_os("RSTSCOPE_LAB_NO_BUILD").is_none() {
            let status = crate::build::cargo_build(&profile_dir, &["-q", "-p", "rstscope-collector", "--bins"])
                .status()
                .expect("run cargo");
            assert!(status.success(), "building rstscope-collector failed");
        }
        Binaries {
            collector: profile_dir.join("rstscope-collector"),
            cli: profile_dir.join("rstscope"),
            agent,
            labhost,
        }
    }
}

/// Why the lab cannot run here (not root, no `ip netns`, missing tools), or `Ok`.
pub fn preflight() -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("not root (network namespaces and live capture need root)");
    }
    for tool in ["ip", "nft", "ethtool", "sysctl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("`{tool}` not found (scripts/install-deps installs it)");
        }
    }
    let probe = format!("rsl{}-probe", std::process::id());
    let out = Command::new("ip").args(["netns", "add", &probe]).output().context("run ip netns add")?;
    if !out.status.success() {
        bail!("`ip netns add` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let ok = Command::new("ip").args(["-n", &probe, "link", "set", "lo", "up"]).output();
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    match ok {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!("cannot configure a namespace: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => bail!("cannot configure a namespace: {e}"),
    }
}

/// A host of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The client.
    Client,
    /// The middlebox router next to the client (nftables, NAT, forger).
    Mbox,
    /// The plain router next to the server.
    R2,
    /// The server.
    Server,
    /// The observer: the collector, reached over separate links.
    Obs,
}

impl Host {
    fn short(self) -> &'static str {
        match self {
            Host::Client => "c",
            Host::Mbox => "m",
            Host::R2 => "r",
            Host::Server => "s",
            Host::Obs => "o",
        }
    }
}

/// Addresses of the lab (documentation ranges only).
pub mod addr {
    /// The client on the path.
    pub const CLIENT4: &str = "198.51.100.2";
    /// The client on the path, IPv6.
    pub const CLIENT6: &str = "2001:db8:1::2";
    /// The mbox towards r2: the client's address after masquerade.
    pub const MBOX_OUT4: &str = "198.51.100.65";
    /// The server.
    pub const SERVER4: &str = "203.0.113.10";
    /// The server, IPv6.
    pub const SERVER6: &str = "2001:db8:3::10";
    /// The collector as agents on the client, mbox and server reach it.
    pub const COLLECTOR_FROM: [(super::Host, &str); 3] = [
        (super::Host::Client, "203.0.113.193"),
        (super::Host::Mbox, "203.0.113.197"),
        (super::Host::Server, "203.0.113.201"),
    ];
}

/// Collector gRPC port inside the obs namespace.
pub const COLLECTOR_PORT: u16 = 50051;

/// A child process, killed (SIGKILL) and reaped when dropped. Its stdout lines arrive on a
/// channel; its stderr goes to a file or is discarded.
pub struct Proc {
    child: Option<Child>,
    lines: Receiver<String>,
    /// What it is, for messages.
    pub what: String,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command, what: &str, stderr: Option<&Path>) -> Result<Proc> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        match stderr {
            Some(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let (child, lines) = spawn_reading_lines(cmd, what, |line| line)?;
        Ok(Proc { child: Some(child), lines, what: what.to_string(), seen: Vec::new() })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits (bounded) for a stdout line containing `needle`.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{}: no line with {needle:?} within {timeout:?}; saw {:?}", self.what, self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{}: exited before printing {needle:?}; saw {:?}", self.what, self.seen)
                }
            }
        }
    }

    /// Waits (bounded) for the process to exit; returns its status and all stdout lines.
    /// Kills it when it overstays.
    pub fn finish(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("running");
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                unregister(child.id());
                bail!("{} did not exit within {timeout:?}; saw {:?}", self.what, self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        unregister(child.id());
        // The reader thread ends at EOF; collect what is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        Ok((status, std::mem::take(&mut self.seen)))
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, `INT`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
    }

    /// SIGKILL now and reap.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister(child.id());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_now();
    }
}

fn unregister(pid: u32) {
    registry().pids.retain(|p| *p != pid);
}

/// The topology. Dropping it removes everything it created.
pub struct Lab {
    /// `rsl<pid>-`.
    pub prefix: String,
    /// Programs.
    pub bins: Binaries,
    /// Scratch directory (collector data, agent state, logs); removed on drop unless
    /// `RSTSCOPE_LAB_KEEP` is set.
    pub dir: PathBuf,
    namespaces: Vec<String>,
}

impl Lab {
    /// Builds the topology. Any failure removes what was created so far (via drop).
    pub fn new(bins: Binaries) -> Result<Lab> {
        install_signal_cleanup();
        let prefix = format!("rsl{}-", std::process::id());
        let dir = std::env::temp_dir().join(format!("rstscope-lab-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab { prefix, bins, dir, namespaces: Vec::new() };
        for host in [Host::Client, Host::Mbox, Host::R2, Host::Server, Host::Obs] {
            let ns = lab.ns(host);
            registry().namespaces.push(ns.clone());
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            lab.namespaces.push(ns);
            lab.ip(host, "link set lo up")?;
            for key in ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"] {
                lab.sysctl(host, key)?;
            }
        }
        // Path links.
        lab.veth(Host::Client, "c-m", Host::Mbox, "m-c")?;
        lab.veth(Host::Mbox, "m-r", Host::R2, "r-m")?;
        lab.veth(Host::R2, "r-s", Host::Server, "s-r")?;
        lab.addr(Host::Client, "c-m", "198.51.100.2/26", "2001:db8:1::2/64")?;
        lab.addr(Host::Mbox, "m-c", "198.51.100.1/26", "2001:db8:1::1/64")?;
        lab.addr(Host::Mbox, "m-r", "198.51.100.65/26", "2001:db8:2::1/64")?;
        lab.addr(Host::R2, "r-m", "198.51.100.66/26", "2001:db8:2::2/64")?;
        lab.addr(Host::R2, "r-s", "203.0.113.1/26", "2001:db8:3::1/64")?;
        lab.addr(Host::Server, "s-r", "203.0.113.10/26", "2001:db8:3::10/64")?;
        lab.ip(Host::Client, "route add default via 198.51.100.1")?;
        lab.ip(Host::Client, "-6 route add default via 2001:db8:1::1")?;
        lab.ip(Host::Server, "route add default via 203.0.113.1")?;
        lab.ip(Host::Server, "-6 route add default via 2001:db8:3::1")?;
        lab.ip(Host::Mbox, "route add 203.0.113.0/26 via 198.51.100.66")?;
        lab.ip(Host::Mbox, "-6 route add 2001:db8:3::/64 via 2001:db8:2::2")?;
        lab.ip(Host::R2, "route add 198.51.100.0/26 via 198.51.100.65")?;
        lab.ip(Host::R2, "-6 route add 2001:db8:1::/64 via 2001:db8:2::1")?;
        for router in [Host::Mbox, Host::R2] {
            lab.sysctl(router, "net.ipv4.ip_forward=1")?;
            lab.sysctl(router, "net.ipv6.conf.all.forwarding=1")?;
        }
        // Observer links: point to point, connected routes only, so gRPC never crosses the path.
        let obs = [
            (
                Host::Client,
                "c-o",
                "o-c",
                "203.0.113.194/30",
                "203.0.113.193/30",
                "2001:db8:ff:1::2/64",
                "2001:db8:ff:1::1/64",
            ),
            (
                Host::Mbox,
                "m-o",
                "o-m",
                "203.0.113.198/30",
                "203.0.113.197/30",
                "2001:db8:ff:2::2/64",
                "2001:db8:ff:2::1/64",
            ),
            (
                Host::Server,
                "s-o",
                "o-s",
                "203.0.113.202/30",
                "203.0.113.201/30",
                "2001:db8:ff:3::2/64",
                "2001:db8:ff:3::1/64",
            ),
        ];
        for (host, here, there, a4, b4, a6, b6) in obs {
            lab.veth(host, here, Host::Obs, there)?;
            lab.addr(host, here, a4, a6)?;
            lab.addr(Host::Obs, there, b4, b6)?;
        }
        Ok(lab)
    }

    /// The namespace name of a host.
    pub fn ns(&self, host: Host) -> String {
        format!("{}{}", self.prefix, host.short())
    }

    /// `ip -n NS ARGS...` (args split on whitespace).
    pub fn ip(&self, host: Host, args: &str) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.ns(host)]).args(args.split_whitespace());
        run(&mut cmd)
    }

    fn sysctl(&self, host: Host, kv: &str) -> Result<()> {
        run(Command::new("ip").args(["netns", "exec", &self.ns(host), "sysctl", "-qw", kv]))
    }

    fn veth(&self, a: Host, a_if: &str, b: Host, b_if: &str) -> Result<()> {
        let (ns_a, ns_b) = (self.ns(a), self.ns(b));
        run(Command::new("ip")
            .args(["-n", &ns_a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &ns_b]))?;
        for (host, ifname) in [(a, a_if), (b, b_if)] {
            // Real checksums on the wire (captures at the sender would show offload's partial
            // ones), and no segmentation offload so packets are what a NIC would send.
            run(Command::new("ip")
                .args(["netns", "exec", &self.ns(host), "ethtool", "-K", ifname, "tx", "off", "rx", "off"])
                .stdout(Stdio::null()))?;
            self.ip(host, &format!("link set {ifname} up"))?;
        }
        Ok(())
    }

    fn addr(&self, host: Host, ifname: &str, v4: &str, v6: &str) -> Result<()> {
        self.ip(host, &format!("addr add {v4} dev {ifname}"))?;
        self.ip(host, &format!("-6 addr add {v6} dev {ifname} nodad"))
    }

    /// The MAC address of an interface.
    pub fn mac(&self, host: Host, ifname: &str) -> Result<String> {
        let out = self.exec(host, &["cat", &format!("/sys/class/net/{ifname}/address")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs a command inside a host to completion (bounded by the command itself).
    pub fn exec(&self, host: Host, argv: &[&str]) -> Result<Output> {
        let out = Command::new("ip").args(["netns", "exec", &self.ns(host)]).args(argv).output()?;
        if !out.status.success() {
            bail!("{argv:?} in {}: {}", self.ns(host), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    }

    /// Starts a program inside a host; stdout lines are readable through the `Proc`.
    pub fn spawn(&self, host: Host, program: &Path, args: &[&str], what: &str) -> Result<Proc> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).arg(program).args(args);
        let log = self.dir.join(format!("{what}.log"));
        Proc::spawn(cmd, what, Some(&log))
    }

    /// Starts `labhost ARGS` inside a host.
    pub fn labhost(&self, host: Host, args: &[&str]) -> Result<Proc> {
        let what = format!("labhost-{}-{}", host.short(), args.first().copied().unwrap_or(""));
        self.spawn(host, &self.bins.labhost.clone(), args, &what)
    }

    /// Loads an nftables ruleset into the mbox (replacing the lab's table).
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        self.nft_clear();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(Host::Mbox), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft -f failed: {}\n{ruleset}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Removes the lab's nftables table from the mbox.
    pub fn nft_clear(&self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns(Host::Mbox), "nft", "delete", "table", "inet", "lab"])
            .stderr(Stdio::null())
            .status();
    }

    /// Starts the collector in the obs namespace with its sled directory under the lab's dir,
    /// and waits (bounded) until it answers.
    pub fn start_collector(&self) -> Result<Proc> {
        let data = self.dir.join("collector-data");
        let data = data.to_str().expect("utf-8 temp dir");
        let listen = format!("0.0.0.0:{COLLECTOR_PORT}");
        let proc = self.spawn(
            Host::Obs,
            &self.bins.collector.clone(),
            &["--listen", &listen, "--data-dir", data],
            "collector",
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.cli(&["status", "-o", "json"]).is_ok() {
                return Ok(proc);
            }
            if Instant::now() > deadline {
                bail!("the collector did not answer within 30 s (log: {})", self.dir.join("collector.log").display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts a live agent named `name` on `host`'s interface `ifname`.
    pub fn start_agent(&self, host: Host, ifname: &str, name: &str) -> Result<Proc> {
        let collector = addr::COLLECTOR_FROM
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, a)| format!("http://{a}:{COLLECTOR_PORT}"))
            .context("no observer link on this host")?;
        let state = self.dir.join(format!("state-{name}"));
        let state = state.to_str().expect("utf-8 temp dir");
        self.spawn(
            host,
            &self.bins.agent.clone(),
            &["--interface", ifname, "--collector", &collector, "--name", name, "--state-dir", state, "--log", "info"],
            &format!("agent-{name}"),
        )
    }

    /// Runs the CLI in the obs namespace against the collector; the JSON lines it printed.
    pub fn cli(&self, args: &[&str]) -> Result<Vec<Value>> {
        let url = format!("http://127.0.0.1:{COLLECTOR_PORT}");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(Host::Obs)])
            .arg(&self.bins.cli)
            .args(args)
            .args(["--collector", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("rstscope {args:?} did not finish within 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("rstscope {args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    /// Waits (bounded) until `rstscope agents` lists all `names` as connected.
    pub fn wait_agents_connected(&self, names: &[&str], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let agents = self.cli(&["agents", "-o", "json"]).unwrap_or_default();
            let connected: BTreeSet<&str> = agents
                .iter()
                .filter(|a| a["connected"].as_bool() == Some(true))
                .filter_map(|a| a["name"].as_str())
                .collect();
            if names.iter().all(|n| connected.contains(n)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agents {names:?} not all connected within {timeout:?}: {agents:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (a namespace with processes in it outlives `ip netns del`).
        let pids = std::mem::take(&mut registry().pids);
        for pid in pids {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
            registry().namespaces.retain(|n| *n != ns);
        }
        if std::env::var_os("RSTSCOPE_LAB_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lab: kept {}", self.dir.display());
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stderr(Stdio::piped()).output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

// Two namespaces and one veth pair, for the live-capture benchmark (`live-bench`).

/// Two network namespaces `{prefix}a` and `{prefix}b` joined by one veth pair (`veth-a` in a,
/// `veth-b` in b) and nothing else: no addresses, no routes, IPv6 off (no neighbour discovery
/// chatter), so frames injected on one end can only arrive at the other. Registered like the
/// lab's namespaces: removed on drop (also while a panic unwinds) and on SIGINT/SIGTERM, with
/// the processes started through [`spawn_in_namespace`]. Never touches the root namespace.
pub struct VethPair {
    /// Namespace of the sending end.
    pub ns_a: String,
    /// Namespace of the receiving end.
    pub ns_b: String,
    /// The interface in `ns_a`.
    pub if_a: String,
    /// The interface in `ns_b`.
    pub if_b: String,
    created: Vec<String>,
}

impl VethPair {
    /// Creates both namespaces and the link. Any failure removes what was created (via drop).
    pub fn new(prefix: &str) -> Result<VethPair> {
        install_signal_cleanup();
        let mut pair = VethPair {
            ns_a: format!("{prefix}a"),
            ns_b: format!("{prefix}b"),
            if_a: "veth-a".into(),
            if_b: "veth-b".into(),
            created: Vec::new(),
        };
        for ns in [pair.ns_a.clone(), pair.ns_b.clone()] {
            registry().namespaces.push(ns.clone());
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            pair.created.push(ns.clone());
            run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
            for key in ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"] {
                run(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", key]))?;
            }
        }
        run(Command::new("ip").args([
            "-n", &pair.ns_a, "link", "add", &pair.if_a, "type", "veth", "peer", "name", &pair.if_b, "netns",
            &pair.ns_b,
        ]))?;
        run(Command::new("ip").args(["-n", &pair.ns_a, "link", "set", &pair.if_a, "up"]))?;
        run(Command::new("ip").args(["-n", &pair.ns_b, "link", "set", &pair.if_b, "up"]))?;
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
            registry().namespaces.retain(|n| *n != ns);
        }
    }
}

/// Runs `argv` inside namespace `ns` to completion (bounded by the command itself); fails on a
/// non-zero exit with its stderr.
pub fn netns_exec(ns: &str, argv: &[&str]) -> Result<Output> {
    let out = Command::new("ip").args(["netns", "exec", ns]).args(argv).output()?;
    if !out.status.success() {
        bail!("{argv:?} in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// Starts `program args` inside namespace `ns` with stdout and stderr going to files (for
/// output too large to keep in memory). The process is registered for the SIGINT/SIGTERM
/// cleanup and killed when the `Proc` drops; its `finish` returns no stdout lines.
pub fn spawn_in_namespace(
    ns: &str,
    program: &Path,
    args: &[&str],
    what: &str,
    stdout: &Path,
    stderr: &Path,
) -> Result<Proc> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program).args(args).stdin(Stdio::null());
    cmd.stdout(std::fs::File::create(stdout).with_context(|| format!("create {}", stdout.display()))?);
    cmd.stderr(std::fs::File::create(stderr).with_context(|| format!("create {}", stderr.display()))?);
    let child = cmd.spawn().with_context(|| format!("start {what}"))?;
    registry().pids.push(child.id());
    // No sender: the channel reads as closed at once.
    let (_, lines) = std::sync::mpsc::channel();
    Ok(Proc { child: Some(child), lines, what: what.to_string(), seen: Vec::new() })
}

// ---------------------------------------------------------------------------------------------
// Additions for the latency benchmark (`latency-bench`): binaries next to a running binary (not
// a test), and children whose stdout lines carry the wall time they were read.
// ---------------------------------------------------------------------------------------------

impl Binaries {
    /// The lab's programs next to the running binary (`<target>/<profile>/<bin>`, e.g. a
    /// benchmark started by `cargo run --release`), all built first with cargo in that profile
    /// (a no-op when they are fresh), so a benchmark never measures old code.
    pub fn next_to_current_exe() -> Result<Binaries> {
        let exe = std::env::current_exe().context("current_exe")?;
        let profile_dir = exe.parent().context("binary in <target>/<profile>")?.to_path_buf();
        let targets = ["-q", "-p", "rstscope-agent", "-p", "rstscope-collector", "--bins"];
        let status = crate::build::cargo_build(
            &profile_dir,
            &[&targets[..], &["-p", "rstscope-tests", "--bin", "labhost"]].concat(),
        )
        .status()
        .context("run cargo build")?;
        if !status.success() {
            bail!("building the lab's binaries failed: {status}");
        }
        Ok(Binaries {
            agent: profile_dir.join("rstscope-agent"),
            collector: profile_dir.join("rstscope-collector"),
            cli: profile_dir.join("rstscope"),
            labhost: profile_dir.join("labhost"),
        })
    }
}

/// A child process whose stdout lines arrive with the wall-clock time they were read, for
/// latency measurements; killed (SIGKILL) and reaped when dropped.
pub struct StampedProc {
    child: Option<Child>,
    /// (when the line was read, the line).
    pub lines: Receiver<(std::time::SystemTime, String)>,
}

impl StampedProc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for StampedProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister(child.id());
        }
    }
}

impl Lab {
    /// Starts a program inside a host; each stdout line is stamped with the wall time it was
    /// read (on a thread that does nothing else, so the stamp is taken as the line arrives).
    pub fn spawn_stamped(&self, host: Host, program: &Path, args: &[&str], what: &str) -> Result<StampedProc> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).arg(program).args(args);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{what}.log")))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let (child, lines) = spawn_reading_lines(cmd, what, |line| (std::time::SystemTime::now(), line))?;
        Ok(StampedProc { child: Some(child), lines })
    }
}

/// Starts `cmd` (its stdout piped), registers it for clean-up, and passes each stdout line
/// through `wrap` on a thread that does nothing else, into the returned channel.
fn spawn_reading_lines<T: Send + 'static>(
    mut cmd: Command,
    what: &str,
    wrap: impl Fn(String) -> T + Send + 'static,
) -> Result<(Child, Receiver<T>)> {
    let mut child = cmd.spawn().with_context(|| format!("start {what}"))?;
    registry().pids.push(child.id());
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(wrap(line)).is_err() {
                break;
            }
        }
    });
    Ok((child, rx))
}
