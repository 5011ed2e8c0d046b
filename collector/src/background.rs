//! Background work at a lower CPU priority than ingest: the correlation's ticker runs here.
//!
//! Why: on a small machine ingest and the correlation share the cores. Acknowledgements are
//! what agents wait for (their spools grow meanwhile), while a decision may come a moment later
//! (its report is due a settle window after the RST anyway). Deciding and storing the reports
//! costs more CPU per event than ingest itself, so at the same priority a burst of batches is
//! acknowledged at about half the speed the cores allow. Linux nice values are per thread and
//! are inherited by the threads a thread creates: a thread with a higher nice value running a
//! current-thread tokio runtime runs the ticker, and the runtime's own blocking pool (spawned
//! from that thread) runs every decision at that priority. In a burst the scheduler gives
//! ingest's threads the CPU and the decisions catch up after; a correlation far behind still
//! holds acknowledgements back through the inbox's bound ([`crate::live::Inbox`]), so memory
//! stays bounded, and when ingest waits the lowered threads get the whole CPU.
//!
//! Elsewhere than Linux the thread runs at normal priority.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// The nice value (0 normal, 19 lowest) of the correlation's threads: the scheduler gives a
/// thread at nice 10 about a tenth of the CPU a normal thread gets when both want it, and all
/// of it when ingest is idle.
pub const CORRELATION_NICE: i32 = 10;

/// A task running on its own thread; dropping this stops it (the task is dropped at its next
/// await point; a blocking call it was waiting for finishes on its own).
#[derive(Debug)]
pub struct Background {
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error only means the task ended already.
            let _ = stop.send(());
        }
    }
}

/// Runs `task` on a new thread called `name` with nice value `nice` (and its blocking calls on
/// threads that inherit it), until it ends or the returned handle is dropped. If no thread can
/// be started, the task runs on the caller's runtime at normal priority (call within one).
pub fn spawn_lowered<F>(name: &str, nice: i32, task: F) -> Background
where
    F: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let run = async move {
        tokio::select! {
            () = task => {}
            _ = stopped => {}
        }
    };
    // Handed over through a slot, so that it can be taken back if the thread does not start.
    let slot = Arc::new(Mutex::new(Some(run)));
    let on_thread = slot.clone();
    let blocking_name = format!("{name}-blk");
    let started = std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let Some(run) = on_thread.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
        if let Err(error) = lower_this_thread(nice) {
            tracing::warn!(%error, nice, "Cannot lower the priority of a background thread; it runs at normal priority.");
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(blocking_name)
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(%error, "Cannot start a background runtime; its task does not run.");
                return;
            }
        };
        runtime.block_on(run);
        // A blocking call in progress finishes on its own thread; nobody waits for it.
        runtime.shutdown_background();
    });
    if let Err(error) = started {
        tracing::warn!(%error, "Cannot start a background thread; its task runs at normal priority.");
        if let Some(run) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
            tokio::spawn(run);
        }
    }
    Background { stop: Some(stop) }
}

/// Sets the calling thread's nice value (Linux: per thread, inherited by threads it creates).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_this_thread(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_thread(_nice: i32) -> std::io::Result<()> {
    Ok(())
}

/// The nice value of the calling thread (Linux), for tests and logs.
#[cfg(target_os = "linux")]
pub fn this_thread_nice() -> std::io::Result<i32> {
    nice_of("/proc/thread-self/stat")
}

/// The nice value in a `/proc/.../stat` file (field 19).
#[cfg(target_os = "linux")]
pub fn nice_of(stat_path: &str) -> std::io::Result<i32> {
    let stat = std::fs::read_to_string(stat_path)?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    after_name
        .split_whitespace()
        .nth(16)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no nice value in {stat_path}")))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn the_task_and_its_blocking_calls_run_lowered_and_stop_on_drop() {
        let (tx, rx) = std::sync::mpsc::channel();
        let base = this_thread_nice().unwrap();
        let handle = spawn_lowered("bg-test", 7, async move {
            let on_thread = this_thread_nice().unwrap();
            let in_blocking = tokio::task::spawn_blocking(|| this_thread_nice().unwrap()).await.unwrap();
            tx.send((on_thread, in_blocking)).unwrap();
            // Runs until stopped.
            std::future::pending::<()>().await;
        });
        let (on_thread, in_blocking) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // 7, unless the test runs unprivileged above it already (only root may lower it).
        assert!(on_thread == 7 || (base > 7 && on_thread == base), "nice {on_thread} (test at {base})");
        assert_eq!(in_blocking, on_thread, "blocking threads inherit the priority");
        assert_eq!(this_thread_nice().unwrap(), base, "the caller's priority is untouched");
        // Dropping the handle ends the task: its sender is dropped, so the channel closes.
        drop(handle);
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
