//! A future polled only when it asked to be: for the rare signals every connection
//! waits on beside its copy (shutdown, its upstream going down).
//!
//! A copy's task wakes for every burst of bytes, and `select!` polls every branch on
//! every wake. A cancellation future takes two locks per poll (the token's flag and its
//! waiter list), and those locks are shared by every connection of the process, so on
//! each wake of each connection the worker threads would contend for the same cache
//! lines. Behind the gate, the signal is polled once to register, then again only after
//! it woke the task itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Polls `F` only on its first poll and after `F`'s own waker fired.
pub struct WakeGate<F> {
    future: F,
    signal: Arc<Signal>,
}

/// Whether the gated future's waker fired, and the task to wake then.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl<F: Future + Unpin> WakeGate<F> {
    pub fn new(future: F) -> Self {
        Self {
            future,
            signal: Arc::new(Signal {
                // Set, so that the first poll registers the future's waker.
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

/// Resolves once either of two pinned futures has, behind one gate.
pub fn either<'a, A: Future, B: Future>(
    mut a: Pin<&'a mut A>,
    mut b: Pin<&'a mut B>,
) -> WakeGate<impl Future<Output = ()> + Unpin + 'a> {
    WakeGate::new(std::future::poll_fn(move |cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }))
}

impl<F: Future + Unpin> Future for WakeGate<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake between the two is not lost.
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.signal.clone());
        Pin::new(&mut self.future).poll(&mut Context::from_waker(&waker))
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `open` is set, and wakes through its waker when
    /// told to.
    struct Probe<'a> {
        polls: &'a AtomicUsize,
        open: &'a AtomicBool,
        waker: &'a std::sync::Mutex<Option<Waker>>,
    }

    impl Future for Probe<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.open.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn the_gated_future_is_polled_only_after_its_own_wake() {
        let polls = AtomicUsize::new(0);
        let open = AtomicBool::new(false);
        let inner_waker = std::sync::Mutex::new(None);
        let mut gate = WakeGate::new(Probe {
            polls: &polls,
            open: &open,
            waker: &inner_waker,
        });
        let task = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&task);

        assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the first poll registers");
        // Wakes of the task for other reasons (bytes on a socket) leave it alone.
        for _ in 0..10 {
            assert!(Pin::new(&mut gate).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);

        open.store(true, Ordering::Relaxed);
        let waker = inner_waker.lock().unwrap().take().expect("registered");
        waker.wake();
        assert!(Pin::new(&mut gate).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_cancellation_behind_the_gate_still_ends_the_wait() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut waiting = std::pin::pin!(token.cancelled());
        let gate = WakeGate::new(std::future::poll_fn(|cx| waiting.as_mut().poll(cx)));
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            cancel.cancel();
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), gate)
            .await
            .expect("the cancellation woke the gate");
    }
}
