//! Building the workspace's binaries from a running test or benchmark.
//!
//! `cargo test -p rstscope-tests` and `cargo run --bin ...-bench` build only their own package's
//! binaries, but they run the agent, the collector and the CLI as real processes: those must be
//! built from the working tree, in the same target directory and profile as the running
//! program, or the tests would exercise stale code.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A `cargo build` of `targets` (for example `["-p", "rstscope-collector", "--bins"]`) into the
/// target directory and profile of `profile_dir` (`<target>/<profile>`), run from the workspace
/// root. The variables cargo sets for a running test or `cargo run` (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_*`, `OUT_DIR`, ...) are removed: build scripts that watch them would
/// otherwise rebuild half the tree.
pub fn cargo_build(profile_dir: &Path, targets: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if (key_text.starts_with("CARGO_") && key_text != "CARGO_HOME") || key_text == "OUT_DIR" {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(workspace_root()).arg("build").args(targets);
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => {
            cmd.arg("--release");
        }
        Some("debug") | None => {}
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    cmd
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
