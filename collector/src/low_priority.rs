//! A thread below the default scheduling priority, for work that may lag behind ingest: the
//! live correlation's ticks (feeding the queue to the engine, deciding, storing reports).
//! Others who take the engine (queries, an agent's hello) feed it on their own threads.
//!
//! Why: on a small machine the correlation (about 20 µs of CPU per event) and ingest (about
//! 5 µs) compete for the same cores, and only ingest holds agents back: an agent waits for its
//! acknowledgements, while the correlation merely decides later when it lags (its queue goes
//! to files, see `backlog.rs`). Running the correlation at a lower priority (nice 10) lets
//! the scheduler give ingest the cores first during a burst; the correlation gets every cycle
//! ingest leaves, so on an idle collector nothing changes. Verdict latency under light load
//! is unaffected: the thread is idle most of the time and is scheduled at once when woken.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// A worker thread at nice [`NICE`] that runs jobs one at a time, in order.
pub struct LowPriority {
    jobs: mpsc::Sender<Job>,
}

/// How much lower the worker's priority is than the default (nice 0).
pub const NICE: i32 = 10;

impl LowPriority {
    /// Starts the worker thread, named `name`. If the priority cannot be lowered (a sandbox
    /// refusing `setpriority`), the thread runs at the default priority and says so once.
    pub fn start(name: &str) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name(name.to_string()).spawn(move || {
            lower_this_threads_priority();
            for job in queue {
                // A panicking job drops its result's sender (its caller gets `None`); the
                // worker goes on with the next one, as a pool thread would.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(LowPriority { jobs })
    }

    /// Runs `job` on the worker and returns its result; `None` if the job panicked.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// Sets the calling thread's nice value to [`NICE`] (on Linux, `setpriority` with
/// `PRIO_PROCESS` and no id applies to the calling thread only).
fn lower_this_threads_priority() {
    if let Err(error) = rustix::process::setpriority_process(None, NICE) {
        tracing::info!(%error, "Cannot lower the correlation thread's priority; it runs at the default.");
    }
}

/// The calling thread's nice value.
#[cfg(test)]
fn this_threads_priority() -> i32 {
    rustix::process::getpriority_process(None).expect("getpriority")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn jobs_run_in_order_at_a_lower_priority() {
        let before = this_threads_priority();
        let worker = LowPriority::start("test-low").unwrap();
        let worker_nice = worker.run(this_threads_priority).await.unwrap();
        // From a caller already above NICE only a privileged process may go back to NICE.
        assert!(
            worker_nice == NICE || (before > NICE && worker_nice == before),
            "the worker's nice value: {worker_nice}"
        );
        // Sent together (join polls them in order); the worker runs them one at a time, in order.
        let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
        let job = |i: u32| {
            let ran = ran.clone();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(u64::from(3 - i) * 10));
                ran.lock().unwrap().push(i);
                i * 10
            }
        };
        let answers = tokio::join!(worker.run(job(0)), worker.run(job(1)), worker.run(job(2)));
        assert_eq!(answers, (Some(0), Some(10), Some(20)));
        assert_eq!(*ran.lock().unwrap(), [0, 1, 2], "the order they were sent in");
        // The caller's own priority is untouched.
        assert_eq!(this_threads_priority(), before);
    }

    #[tokio::test]
    async fn a_panicking_job_returns_none_and_the_worker_goes_on() {
        let worker = LowPriority::start("test-low-panic").unwrap();
        assert_eq!(worker.run(|| -> u8 { panic!("on purpose") }).await, None);
        assert_eq!(worker.run(|| 1).await, Some(1));
    }
}
