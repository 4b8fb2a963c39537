//! The threads of `runtime.scheduler = "per_thread"`: each runs a single-threaded tokio
//! runtime of its own, on which the accept loops placed there run, and with them the
//! connections they accept (a task spawns on the runtime that runs its spawner).
//!
//! The work-stealing runtime wakes other threads to share out every new task and every
//! readiness event; here a connection never leaves the thread that accepted it, so it
//! costs no wake-up of another thread. The main runtime keeps what is not a connection:
//! controller, health checks, admin API, signals, reload, upgrade.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// What each worker thread is called, with its number: `top -H` and `/proc/*/task/*/comm`
/// show them (15 bytes at most there).
pub const THREAD_NAME: &str = "sy-worker-";

/// The worker threads and their runtimes. Dropping it stops them without waiting;
/// [`stop`](Self::stop) waits until each has ended.
#[derive(Debug)]
pub struct Workers {
    runtimes: Vec<Handle>,
    /// The runtime the next placed task goes to: round robin, so that the
    /// `SO_REUSEPORT` siblings of an address, placed one after another, land on as many
    /// different threads as there are siblings.
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

// === impl Workers ===

impl Workers {
    /// Starts `count` threads (at least one), each running its own runtime until
    /// [`stop`](Self::stop) or drop.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut runtimes = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build();
            let started = runtime.and_then(|runtime| {
                let handle = runtime.handle().clone();
                let stop = stop.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("{THREAD_NAME}{index}"))
                    // The tasks still there when it stops (none after a drain) are
                    // dropped with the runtime, on this thread.
                    .spawn(move || {
                        runtime.block_on(async {
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = keep_a_timer_due() => {}
                            }
                        });
                    })?;
                Ok((handle, thread))
            });
            match started {
                Ok((handle, thread)) => {
                    runtimes.push(handle);
                    threads.push(thread);
                }
                Err(e) => {
                    // The threads already started end with the token.
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Self {
            runtimes,
            next: AtomicUsize::new(0),
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// The workers' runtimes, to spread a burst of work over their threads.
    pub fn runtimes(&self) -> &[Handle] {
        &self.runtimes
    }

    /// How many worker threads run.
    pub fn len(&self) -> usize {
        self.runtimes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runtimes.is_empty()
    }

    /// Runs `task` on the next worker's runtime, and with it whatever it spawns.
    pub fn place<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Relaxed) % self.runtimes.len();
        // A stopped runtime drops the task at once: only after the drain, when there is
        // nothing left to accept for.
        drop(self.runtimes[index].spawn(task));
    }

    /// Stops every worker runtime, dropping what still runs there, and waits until
    /// each thread has ended. Blocks: call it off the async threads.
    pub fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            // A panic there was already reported by the panic hook; nothing to add.
            let _ = thread.join();
        }
    }
}

/// Never ends; keeps a timer of this runtime due within a second. Tokio's time driver
/// wakes its own thread (an eventfd write, then one more epoll_wait) whenever a new
/// timer falls due before the earliest one it went to sleep for, and with none at all
/// that is every new connection's connect timeout. With this tick the thread sleeps for
/// at most a second, and a timeout of a second or more is never the earliest.
pub async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    const SOON: Duration = Duration::from_secs(10);

    #[test]
    fn tasks_go_round_robin_each_to_its_own_named_thread_and_stop_ends_every_thread() {
        let workers = Workers::start(3).expect("start");
        assert_eq!(workers.len(), 3);
        let (sent, received) = mpsc::channel();
        for _ in 0..6 {
            let sent = sent.clone();
            workers.place(async move {
                // What the task spawns stays on its thread too.
                let inner =
                    tokio::spawn(async { std::thread::current().name().map(str::to_string) });
                let spawned_on = inner.await.ok().flatten();
                let ran_on = std::thread::current().name().map(str::to_string);
                let _ = sent.send((ran_on, spawned_on));
            });
        }
        let mut names = Vec::new();
        for _ in 0..6 {
            let (ran_on, spawned_on) = received.recv_timeout(SOON).expect("every task ran");
            assert_eq!(ran_on, spawned_on);
            names.push(ran_on.expect("named"));
        }
        names.sort();
        assert_eq!(
            names,
            [
                "sy-worker-0",
                "sy-worker-0",
                "sy-worker-1",
                "sy-worker-1",
                "sy-worker-2",
                "sy-worker-2"
            ]
        );

        // A task that would run for ever does not hold the stop.
        let forever = Arc::new(());
        let held = forever.clone();
        workers.place(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        workers.stop();
        assert_eq!(Arc::strong_count(&forever), 1, "dropped with its runtime");
        // Placing after the stop drops the task instead of running it.
        let late = forever.clone();
        workers.place(async move {
            let _late = late;
        });
        assert_eq!(Arc::strong_count(&forever), 1);
    }

    #[test]
    fn at_least_one_thread_runs() {
        let workers = Workers::start(0).expect("start");
        assert_eq!(workers.len(), 1);
    }
}
