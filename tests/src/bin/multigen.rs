//! `multigen --table`: prints the multi-vantage scenario table.
//! `multigen OUT_DIR [SCENARIO ...]`: writes each scenario's captures (one per vantage) into
//! `OUT_DIR/<scenario>/` with an `expect.txt`, and prints the `rstscope analyze` command for it.
//! `--skew-scale F` (first) multiplies every clock skew by F (0: all clocks agree), to tell clock
//! problems from others.

use anyhow::{bail, Context, Result};
use rstscope_tests::multigen::{scenarios, Origin, Scenario};

fn origin(o: Origin) -> String {
    match o {
        Origin::Host(side) => format!("{side:?}").to_lowercase(),
        Origin::Forger { pos, claimed } => format!("forger at hop {pos} as {}", format!("{claimed:?}").to_lowercase()),
    }
}

fn table_row(s: &Scenario) -> Vec<String> {
    let mut rows = Vec::new();
    let agents: Vec<&str> = s.vantages.iter().map(|v| v.name).collect();
    if s.expect.is_empty() {
        rows.push(format!(
            "{:<26} {:<10} {:<22} {:<5} {:<17} no RST; {} connections",
            s.name,
            "-",
            "-",
            "-",
            agents.join(","),
            s.expected_connections()
        ));
    }
    for e in &s.expect {
        let p = &s.packets[e.packet];
        rows.push(format!(
            "{:<26} {:<10} {:<22} {:<5} {:<17} #{} {} from {}: {}",
            s.name,
            e.verdict.to_string(),
            e.cause,
            e.both_directions,
            e.seen_by.join(","),
            e.packet,
            p.flags,
            origin(p.origin),
            e.why
        ));
    }
    rows
}

fn describe(s: &Scenario) -> String {
    let mut out = format!("{}: {}\n", s.name, s.summary);
    for v in &s.vantages {
        out.push_str(&format!("  vantage {} at hop {} skew {:+.3}s\n", v.name, v.pos, v.skew_ns as f64 / 1e9));
    }
    for row in table_row(s) {
        out.push_str(&format!("  {row}\n"));
    }
    out
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut all = scenarios();
    if args.first().map(String::as_str) == Some("--skew-scale") {
        let scale: f64 = args.get(1).context("--skew-scale F")?.parse().context("--skew-scale F")?;
        for v in all.iter_mut().flat_map(|s| s.vantages.iter_mut()) {
            v.skew_ns = (v.skew_ns as f64 * scale).round() as i64;
        }
        args.drain(..2);
    }
    if args.first().map(String::as_str) == Some("--table") {
        println!("{:<26} {:<10} {:<22} {:<5} {:<17} what", "scenario", "verdict", "cause", "both", "seen by");
        for s in &all {
            for row in table_row(s) {
                println!("{row}");
            }
        }
        return Ok(());
    }
    let Some((out_dir, names)) = args.split_first() else {
        bail!("usage: multigen --table | multigen OUT_DIR [SCENARIO ...]");
    };
    for s in &all {
        if !names.is_empty() && !names.iter().any(|n| n == s.name) {
            continue;
        }
        let problems = s.self_check();
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        let dir = std::path::Path::new(out_dir).join(s.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = s.write(&dir).with_context(|| format!("writing {}", dir.display()))?;
        std::fs::write(dir.join("expect.txt"), describe(s))?;
        let args: Vec<String> = files.iter().map(|(n, p)| format!("{n}={}", p.display())).collect();
        println!("rstscope analyze {} -o json", args.join(" "));
    }
    Ok(())
}
