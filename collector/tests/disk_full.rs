//! A full disk under the collector: ingest is refused with a clear error, nothing acknowledged
//! is lost, queries keep working, and ingest resumes once there is room again.
//!
//! Needs root (it mounts a small tmpfs of its own and unmounts it, also on failure); prints
//! `SKIPPED` otherwise. Under `CI=true` (the CI runs as root) not being able to is a failure,
//! unless `RSTSCOPE_LAB=skip` says the machine has no such rights, as for the netns lab.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rstscope_proto::v1;
use tonic::Code;

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "rstscope-test", &dir.path().to_string_lossy()])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallDisk { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}"), &self.dir.path().to_string_lossy()])
            .status()
            .expect("mount");
        assert!(status.success(), "remount");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a failed test may still hold files open in it.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn resets(first: u64, n: u64) -> Vec<v1::Event> {
    (first..first + n).map(|i| reset(i as i64, 1024 + (i % 60_000) as u32)).collect()
}

async fn stored(dir: &Path) -> u64 {
    let store = open_store(dir).await;
    let n = store.status().unwrap().resets;
    drop(store);
    n
}

#[tokio::test]
async fn a_full_disk_refuses_ingest_clearly_and_loses_nothing() {
    let disk = match SmallDisk::mount("3m") {
        Ok(disk) => disk,
        Err(why) => {
            let required = std::env::var("CI").is_ok_and(|v| v == "true")
                && std::env::var("RSTSCOPE_LAB").map_or(true, |v| v != "skip");
            assert!(!required, "cannot mount a tmpfs for the full-disk test: {why}");
            eprintln!("SKIPPED a_full_disk_refuses_ingest_clearly_and_loses_nothing: cannot mount a tmpfs ({why})");
            return;
        }
    };
    let collector = start(&disk.path()).await;
    // A follower opened before the disk fills keeps its stream through the store's reopening.
    let mut follow = collector.query(None).await.follow_resets(v1::ResetFilter::default()).await.unwrap().into_inner();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn(async move {
        while let Ok(Some(record)) = follow.message().await {
            if seen_tx.send(record.event.map_or(0, |e| e.seq)).is_err() {
                break;
            }
        }
    });
    let (mut agent, _) = AgentStream::connect(&collector, "edge-1", "boot-a").await;
    let per_batch = 500u64;
    let mut acked = 0u64;
    let mut refusal = None;
    for seq in 1..=400u64 {
        match agent.send(batch(seq, resets((seq - 1) * per_batch, per_batch))).await {
            Ok(n) => acked = n,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("a 3 MB disk fills up within 200k resets");
    eprintln!("refused after {acked} batches: {:?} {}", refusal.code(), refusal.message());
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("storage is full"), "{}", refusal.message());
    // Queries still answer.
    let status = collector.query(None).await.status(v1::StatusRequest {}).await.expect("status answers");
    assert!(status.into_inner().resets >= acked * per_batch);

    // Room again: the agent reconnects, resends from its durable number, and everything is there.
    disk.grow("64m");
    let mut resumed = None;
    for _ in 0..100 {
        match AgentStream::open(&collector, None, hello("edge-1", "boot-a")).await {
            Ok(mut stream) => match stream.next().await {
                Ok(v1::collector_message::Kind::Welcome(welcome)) => {
                    resumed = Some((stream, welcome.durable_seq));
                    break;
                }
                // The old stream not yet gone, or the store not reopened yet (it is tried at
                // most every 5 s, and a try may have come while the disk was still full).
                Err(status) if matches!(status.code(), Code::AlreadyExists | Code::ResourceExhausted) => {}
                other => panic!("unexpected {other:?}"),
            },
            Err(status) if matches!(status.code(), Code::AlreadyExists | Code::ResourceExhausted) => {}
            Err(status) => panic!("{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut agent, durable) = resumed.expect("the agent reconnects");
    assert_eq!(durable, acked, "the durable number is the last acknowledged batch");
    let last = acked + 5;
    for seq in durable + 1..=last {
        let n = agent.send(batch(seq, resets((seq - 1) * per_batch, per_batch))).await.expect("stored with room");
        assert_eq!(n, seq);
    }
    // The follower sees the resets stored after the reopening (`seq` is 1000 + the reset's index).
    let newest = 1000 + (last * per_batch - 1) as u32;
    let followed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(seq) = seen_rx.recv().await {
            if seq == newest {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(followed, Ok(true), "the follower's stream outlives the store's reopening");
    follower.abort();
    drop(agent);
    collector.stop().await;
    assert_eq!(stored(&disk.path()).await, last * per_batch, "every batch exactly once");
}
