//! The opening exchange of a connection whose pool sets `first_byte_timeout` or
//! `replay_unanswered`: from connect until the upstream's first byte.
//!
//! Until then the client's bytes are forwarded as they come and, within the replay
//! bound, kept; the upstream is watched for its first byte. When it answers, the copy
//! takes over and the kept bytes are dropped. When it does not (the timeout passes, it
//! closes, or it is marked down), the caller may connect elsewhere and send the kept
//! bytes again. Nothing is held while both sides are quiet: a copy buffer is borrowed
//! only for a read that readiness says will find bytes.

use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::copy::{Buffer, Counters};
use super::tls::{ClientStream, UpstreamStream, client_socket, upstream_socket};
use crate::shutdown::Shutdown;

/// What the client has sent so far, kept for a replay while it fits the bound.
#[derive(Debug)]
pub struct Replay {
    bound: usize,
    bytes: Vec<u8>,
    /// More than `bound` was sent: nothing can be replayed any more.
    exceeded: bool,
    /// The client finished sending (its FIN is part of what a new upstream must see).
    finished: bool,
    /// Bytes every new upstream gets anyway (those that followed a PROXY header).
    early: usize,
}

/// What the opening phase is bounded by.
pub struct Bounds<'a> {
    pub first_byte_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// Cancelled when the upstream's connections must close (down, maint, drain).
    pub close: &'a CancellationToken,
    pub shutdown: &'a Shutdown,
}

/// How the opening phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// The upstream answered (its first bytes already reached the client), or there is
    /// nothing left to wait for: the copy takes over.
    Handover,
    /// The upstream left the client unanswered.
    Unanswered(Unanswered),
    /// No byte either way for `idle_timeout`.
    Idle,
    /// The client reset or failed.
    ClientFailed,
    /// The shutdown grace ended.
    Shutdown,
}

/// Why an upstream is abandoned before its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// Marked down, put in maint or drained with its connections closed.
    Down,
    /// It closed or reset the connection.
    Closed,
    /// The client's bytes waited `first_byte_timeout`.
    Timeout,
}

/// Byte counts of the opening phase, for the access log and the copy's totals.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Which side readiness woke.
enum Woken {
    Client,
    Upstream,
}

/// Sends what `replay` kept to a fresh upstream, then forwards until the upstream's
/// first byte or until it is abandoned. `inbound` counts the client's bytes the first
/// time they pass, `outbound` the upstream's.
pub async fn until_answered(
    client: &mut ClientStream,
    upstream: &mut UpstreamStream,
    replay: &mut Replay,
    bounds: &Bounds<'_>,
    inbound: &Counters<'_>,
    outbound: &Counters<'_>,
    moved: &mut Moved,
) -> Opening {
    let mut waiting_since = replay.has_sent().then(Instant::now);
    let mut last_activity = Instant::now();
    let stop = async {
        tokio::select! {
            _ = bounds.close.cancelled() => Opening::Unanswered(Unanswered::Down),
            _ = bounds.shutdown.force_closed() => Opening::Shutdown,
        }
    };
    let mut stop = std::pin::pin!(stop);
    if !replay.bytes.is_empty() || replay.finished {
        let resend = async {
            upstream.write_all(&replay.bytes).await?;
            if replay.finished {
                upstream.shutdown().await?;
            }
            upstream.flush().await
        };
        tokio::select! {
            sent = resend => if sent.is_err() {
                return Opening::Unanswered(Unanswered::Closed);
            },
            end = &mut stop => return end,
        }
        count(inbound, replay.bytes.len(), false);
    }
    loop {
        // Once nothing can be replayed and no timeout watches the answer, the copy
        // does the rest as well.
        if !replay.replayable() && bounds.first_byte_timeout.is_none() {
            return Opening::Handover;
        }
        let first_byte_deadline = waiting_since
            .zip(bounds.first_byte_timeout)
            .map(|(t, d)| t + d);
        let idle_deadline = bounds.idle_timeout.map(|d| last_activity + d);
        let deadline = match (first_byte_deadline, idle_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let woken = tokio::select! {
            biased;
            end = &mut stop => return end,
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                return if first_byte_deadline.is_some_and(|d| Instant::now() >= d) {
                    Opening::Unanswered(Unanswered::Timeout)
                } else {
                    Opening::Idle
                };
            }
            _ = upstream_socket(upstream).readable() => Woken::Upstream,
            _ = client_socket(client).readable(), if !replay.finished => Woken::Client,
        };
        let mut buffer = Buffer::take();
        let buf = buffer.as_mut();
        match woken {
            Woken::Upstream => match upstream.read(buf).now_or_never() {
                None => continue,
                Some(Ok(0) | Err(_)) => return Opening::Unanswered(Unanswered::Closed),
                Some(Ok(n)) => {
                    count(outbound, n, true);
                    moved.upstream_to_client += n as u64;
                    let answered = async {
                        client.write_all(&buf[..n]).await?;
                        client.flush().await
                    };
                    tokio::select! {
                        written = answered => return match written {
                            Ok(()) => Opening::Handover,
                            Err(_) => Opening::ClientFailed,
                        },
                        end = &mut stop => return end,
                    }
                }
            },
            Woken::Client => {
                // A TLS session may hold more plaintext than one read takes while its
                // socket has nothing new: read until a read comes back short.
                loop {
                    let n = match client.read(buf).now_or_never() {
                        None => break,
                        Some(Err(_)) => return Opening::ClientFailed,
                        Some(Ok(0)) => {
                            replay.finished = true;
                            let finished = async {
                                upstream.shutdown().await?;
                                upstream.flush().await
                            };
                            tokio::select! {
                                sent = finished => if sent.is_err() {
                                    return Opening::Unanswered(Unanswered::Closed);
                                },
                                end = &mut stop => return end,
                            }
                            break;
                        }
                        Some(Ok(n)) => n,
                    };
                    last_activity = Instant::now();
                    waiting_since.get_or_insert(last_activity);
                    replay.keep(&buf[..n]);
                    count(inbound, n, true);
                    moved.client_to_upstream += n as u64;
                    let forward = async {
                        upstream.write_all(&buf[..n]).await?;
                        upstream.flush().await
                    };
                    // A hung upstream stops reading once its window is full: the
                    // deadlines bound this write as much as the wait for an answer.
                    let first_byte_deadline = waiting_since
                        .zip(bounds.first_byte_timeout)
                        .map(|(t, d)| t + d);
                    tokio::select! {
                        sent = forward => if sent.is_err() {
                            return Opening::Unanswered(Unanswered::Closed);
                        },
                        _ = sleep_until(first_byte_deadline.unwrap_or_else(Instant::now)), if first_byte_deadline.is_some() => {
                            return Opening::Unanswered(Unanswered::Timeout);
                        }
                        end = &mut stop => return end,
                    }
                    if n < buf.len() {
                        break;
                    }
                }
            }
        }
    }
}

/// Counts `n` bytes of one direction; `first_pass` is false for bytes sent again.
fn count(counters: &Counters<'_>, n: usize, first_pass: bool) {
    use std::sync::atomic::Ordering::Relaxed;
    if first_pass {
        counters.listener.fetch_add(n as u64, Relaxed);
    }
    counters.upstream.fetch_add(n as u64, Relaxed);
}

/// Drops an abandoned upstream connection with a reset, so that a hung server that
/// resumes later finds no unread request to execute a second time.
pub fn abandon(upstream: UpstreamStream) {
    let _ = socket2::SockRef::from(upstream_socket(&upstream)).set_linger(Some(Duration::ZERO));
    drop(upstream);
}

// === impl Replay ===

impl Replay {
    /// Keeps up to `bound` bytes, counting the `early` bytes each connect sends anyway;
    /// a bound of 0 keeps nothing, so that only a client that has sent nothing at all
    /// can move.
    pub fn new(bound: usize, early: usize) -> Self {
        Self {
            bound: bound.saturating_sub(early),
            bytes: Vec::new(),
            exceeded: early > bound,
            finished: false,
            early,
        }
    }

    /// Whether the client has sent anything the upstream could answer.
    fn has_sent(&self) -> bool {
        self.early > 0 || self.exceeded || !self.bytes.is_empty()
    }

    /// Whether a new upstream can be given everything the client has sent so far.
    pub fn replayable(&self) -> bool {
        !self.exceeded
    }

    fn keep(&mut self, data: &[u8]) {
        if self.exceeded {
            return;
        }
        if self.bytes.len() + data.len() > self.bound {
            self.exceeded = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(data);
    }
}
