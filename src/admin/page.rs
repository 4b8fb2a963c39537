//! The live page (`GET /`) and the event stream behind it (`GET /events/stream`).
//!
//! The page is one HTML file built into the binary (`page.html`: markup, style and
//! script, nothing fetched from elsewhere). The server fills it with a rendering of the
//! state at request time, so that it reads without JavaScript; the script then follows
//! the event stream and redraws from each `status` frame with the same markup.
//!
//! The stream is pulled, not pushed: a frame is built only when hyper asks for the next
//! one, from the event ring (read every [`POLL_INTERVAL`] from the last id sent) and a
//! fresh view. A slow reader therefore costs no memory and no task, only its admin slot,
//! which the server bounds (see `server`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use hyper::body::{Body, Frame};
use serde::Serialize;
use tokio::time::Instant;

use super::EventView;
use crate::Proxy;
use crate::controller::ControlError;
use crate::events::Event;
use crate::metrics::CONNECT_BUCKETS;
use crate::shutdown::Shutdown;
use crate::status::{ListenerView, RampView, TierRampView};

const TEMPLATE: &str = include_str!("page.html");

/// How often a stream looks for new events: a change shows on the page within this
/// plus the browser's drawing time.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A stream sends the view when it changed, at most this often (and at once after an
/// event).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// A silent stream sends a comment this often, so that proxies and the browser see
/// the connection alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How often the connect latency histograms are sampled, and how many samples are
/// kept: the latency shown is over the last minute.
const LATENCY_SAMPLE_EVERY: Duration = Duration::from_secs(5);
const LATENCY_SAMPLES: usize = 12;

/// Events the page shows (the stream sends them all).
const TIMELINE_LENGTH: usize = 100;

/// What the page shows; also the `status` frames of the event stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PageView {
    pub now_unix_ms: u64,
    /// The newest event when this view was taken.
    pub last_event_id: u64,
    pub listeners: Vec<ListenerLine>,
    pub pools: Vec<PoolCard>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ListenerLine {
    pub name: String,
    pub pool: String,
    pub binds: Vec<String>,
    pub connections_active: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolCard {
    pub name: String,
    /// Priority of the active tier; `None` when no upstream is usable.
    pub active_tier: Option<u32>,
    pub failback: String,
    pub failovers: u64,
    pub failbacks: u64,
    pub connections_active: u64,
    pub connect: LatencyView,
    /// After a failback with `slow_start`: the failed-back tier's growing share.
    pub failback_ramp: Option<TierRampView>,
    /// Best (lowest priority number) first.
    pub tiers: Vec<TierView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TierView {
    pub priority: u32,
    pub active: bool,
    pub upstreams: Vec<UpstreamLine>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UpstreamLine {
    pub name: String,
    pub address: String,
    pub state: String,
    pub reason: String,
    pub since_unix_ms: u64,
    pub connections_active: u64,
    /// While it ramps up after coming back (`slow_start`).
    pub slow_start: Option<RampView>,
}

/// Connect latency (client arrival to upstream connected) over the last minute,
/// estimated from the histogram's buckets.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyView {
    /// How many seconds the figures cover (less than a minute just after the start).
    pub window_seconds: u64,
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Samples of every pool's cumulative connect histogram, oldest first.
#[derive(Debug, Default)]
pub struct LatencyHistory {
    samples: Mutex<VecDeque<LatencySample>>,
}

#[derive(Debug)]
struct LatencySample {
    at: Instant,
    /// Cumulative bucket counts by pool name.
    pools: HashMap<String, Vec<u64>>,
}

/// The response body of `GET /events/stream`.
pub struct EventStream {
    /// Taken on the first poll, so that a refused stream costs nothing.
    start: Option<Streaming>,
    frames: Option<Pin<Box<dyn Stream<Item = Bytes> + Send>>>,
}

/// A stream's position and what it needs to go on.
struct Streaming {
    proxy: Proxy,
    latency: Arc<LatencyHistory>,
    shutdown: Shutdown,
    ends: Option<Instant>,
    last_event_id: u64,
    /// The last view sent, with its clock zeroed, to send only changes.
    last_view: Option<PageView>,
    next_status: Instant,
    last_sent: Instant,
    started: bool,
    /// The closing comment went out; the next poll ends the stream.
    said_goodbye: bool,
}

// === impl PageView ===

impl PageView {
    /// The state now: pools from the controller, connections from the listeners'
    /// counters, latency from `latency`.
    pub async fn take(proxy: &Proxy, latency: &LatencyHistory) -> Result<Self, ControlError> {
        let last_event_id = proxy.events.since(0).last().map_or(0, |e| e.id);
        let pools = proxy.controller.status().await?;
        let snapshot = proxy.snapshot.load();
        let now = Instant::now();
        let pools = pools
            .into_iter()
            .map(|pool| {
                let mut priorities: Vec<u32> = pool.upstreams.iter().map(|u| u.priority).collect();
                priorities.sort_unstable();
                priorities.dedup();
                let tiers = priorities
                    .into_iter()
                    .map(|priority| TierView {
                        priority,
                        active: pool.active_tier == Some(priority),
                        upstreams: pool
                            .upstreams
                            .iter()
                            .filter(|u| u.priority == priority)
                            .map(|u| UpstreamLine {
                                name: u.name.clone(),
                                address: u.address.clone(),
                                state: u.state.clone(),
                                reason: u.reason.clone(),
                                since_unix_ms: u.since_unix_ms,
                                connections_active: u.connections_active,
                                slow_start: u.slow_start.clone(),
                            })
                            .collect(),
                    })
                    .collect();
                let connect = snapshot
                    .pool(&pool.name)
                    .map_or_else(LatencyView::none, |r| {
                        latency.last_minute(&pool.name, &r.stats.connect_seconds.read().0, now)
                    });
                PoolCard {
                    connections_active: pool.upstreams.iter().map(|u| u.connections_active).sum(),
                    name: pool.name,
                    active_tier: pool.active_tier,
                    failback: pool.failback,
                    failovers: pool.failovers,
                    failbacks: pool.failbacks,
                    connect,
                    failback_ramp: pool.failback_ramp,
                    tiers,
                }
            })
            .collect();
        let listeners = super::listener_views(proxy)
            .into_iter()
            .map(|l: ListenerView| ListenerLine {
                name: l.name,
                pool: l.pool,
                binds: l.binds,
                connections_active: l.connections_active,
            })
            .collect();
        Ok(Self {
            now_unix_ms: unix_ms(),
            last_event_id,
            listeners,
            pools,
        })
    }

    /// The whole page, with this view and `events` (oldest first) drawn in.
    pub fn render_page(&self, events: &[Event]) -> String {
        fill(
            TEMPLATE,
            &[
                ("now_unix_ms", &self.now_unix_ms.to_string()),
                ("last_event_id", &self.last_event_id.to_string()),
                ("listeners", &self.render_listeners()),
                ("pools", &self.render_pools()),
                ("timeline", &render_timeline(events, self.now_unix_ms)),
            ],
        )
    }

    fn render_listeners(&self) -> String {
        let mut out = String::new();
        for l in &self.listeners {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
                escape(&l.name),
                escape(&l.binds.join(", ")),
                escape(&l.pool),
                l.connections_active
            );
        }
        out
    }

    fn render_pools(&self) -> String {
        let mut out = String::new();
        for p in &self.pools {
            let active = p.active_tier.map_or("none".to_string(), |t| t.to_string());
            let _ = write!(
                out,
                "<article class=\"pool{}\" data-pool=\"{}\" data-active-tier=\"{active}\">\
                 <h2>{} <span class=\"badge\">active tier {active}</span></h2>\
                 <p class=\"meta\">failback {} · failovers {} · failbacks {} · {} open · connect {}</p>",
                if p.active_tier.is_none() {
                    " unusable"
                } else {
                    ""
                },
                escape(&p.name),
                escape(&p.name),
                escape(&p.failback),
                p.failovers,
                p.failbacks,
                p.connections_active,
                p.connect.describe(),
            );
            if let Some(ramp) = &p.failback_ramp {
                let _ = write!(
                    out,
                    "<p class=\"ramp\">slow start: tier {} takes {}% of new connections, tier {} the rest ({} s left)</p>",
                    ramp.to_tier,
                    ramp.share_percent,
                    ramp.from_tier,
                    ramp.remaining_ms.div_ceil(1000),
                );
            }
            for t in &p.tiers {
                let _ = write!(
                    out,
                    "<div class=\"tier{}\" data-tier=\"{}\"><h3>tier {}{}</h3><ul>",
                    if t.active { " active" } else { "" },
                    t.priority,
                    t.priority,
                    if t.active {
                        " <span class=\"mark\">active</span>"
                    } else {
                        ""
                    },
                );
                for u in &t.upstreams {
                    let _ = write!(
                        out,
                        "<li class=\"upstream state-{state}\" data-upstream=\"{name}\" data-state=\"{state}\">\
                         <b>{name}</b> <code>{address}</code> <span class=\"state\">{state}</span> \
                         <span class=\"reason\">{reason}</span> \
                         <span class=\"since\">since <time data-ms=\"{since}\">{ago}</time></span> \
                         <span class=\"conns\">{conns} open</span>{ramp}</li>",
                        state = escape(&u.state),
                        name = escape(&u.name),
                        address = escape(&u.address),
                        reason = escape(&u.reason),
                        since = u.since_unix_ms,
                        ago = ago(self.now_unix_ms, u.since_unix_ms),
                        conns = u.connections_active,
                        ramp = u.slow_start.as_ref().map_or(String::new(), |r| format!(
                            " <span class=\"ramp\">slow start {}% ({} s left)</span>",
                            r.share_percent,
                            r.remaining_ms.div_ceil(1000)
                        )),
                    );
                }
                out.push_str("</ul></div>");
            }
            out.push_str("</article>");
        }
        out
    }
}

fn render_timeline(events: &[Event], now_unix_ms: u64) -> String {
    let mut out = String::new();
    for e in events.iter().rev().take(TIMELINE_LENGTH) {
        let subject = match &e.upstream {
            Some(u) => format!("{} / {}", escape(&e.pool), escape(u)),
            None => format!("{} tier", escape(&e.pool)),
        };
        let _ = write!(
            out,
            "<li data-id=\"{}\"><time data-ms=\"{}\">{}</time> <b>{subject}</b> {} → {} <span class=\"reason\">{}</span></li>",
            e.id,
            e.at_unix_ms,
            ago(now_unix_ms, e.at_unix_ms),
            escape(&e.old),
            escape(&e.new),
            escape(&e.reason),
        );
    }
    out
}

// === impl LatencyView ===

impl LatencyView {
    fn none() -> Self {
        Self {
            window_seconds: 0,
            count: 0,
            p50_ms: None,
            p99_ms: None,
        }
    }

    fn describe(&self) -> String {
        match (self.p50_ms, self.p99_ms) {
            (Some(p50), Some(p99)) => format!(
                "p50 {} / p99 {} ({} in {} s)",
                milliseconds(p50),
                milliseconds(p99),
                self.count,
                self.window_seconds
            ),
            _ => format!("— (none in {} s)", self.window_seconds),
        }
    }
}

fn milliseconds(ms: f64) -> String {
    if ms >= CONNECT_BUCKETS[CONNECT_BUCKETS.len() - 1] * 1000.0 {
        format!("> {ms:.0} ms")
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

// === impl LatencyHistory ===

impl LatencyHistory {
    /// Samples every pool's histogram until shutdown begins.
    pub async fn sample(self: Arc<Self>, proxy: Proxy, shutdown: Shutdown) {
        let mut every = tokio::time::interval(LATENCY_SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.stopping() => return,
                _ = every.tick() => {}
            }
            let snapshot = proxy.snapshot.load();
            let pools = snapshot
                .pools()
                .map(|r| (r.config.name.clone(), r.stats.connect_seconds.read().0))
                .collect();
            self.push(Instant::now(), pools);
        }
    }

    fn push(&self, at: Instant, pools: HashMap<String, Vec<u64>>) {
        let mut samples = self.lock();
        if samples.len() == LATENCY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(LatencySample { at, pools });
    }

    /// Latency of `pool` between the oldest sample kept and `cumulative` (its
    /// histogram read at `now`).
    fn last_minute(&self, pool: &str, cumulative: &[u64], now: Instant) -> LatencyView {
        let samples = self.lock();
        let (since, baseline) = match samples.front() {
            Some(s) => (s.at, s.pools.get(pool)),
            None => (now, None),
        };
        // A pool removed and added again starts from zero: its old counts are no base.
        let baseline = baseline.filter(|b| {
            b.len() == cumulative.len() && b.iter().zip(cumulative).all(|(b, c)| b <= c)
        });
        let delta: Vec<u64> = match baseline {
            Some(b) => cumulative.iter().zip(b).map(|(c, b)| c - b).collect(),
            None => cumulative.to_vec(),
        };
        let count = delta.last().copied().unwrap_or(0);
        LatencyView {
            window_seconds: now.saturating_duration_since(since).as_secs(),
            count,
            p50_ms: quantile(&delta, 0.50).map(|s| s * 1000.0),
            p99_ms: quantile(&delta, 0.99).map(|s| s * 1000.0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<LatencySample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `q` quantile in seconds of a histogram given as cumulative counts per bucket of
/// [`CONNECT_BUCKETS`] (the last one +Inf), interpolated linearly inside its bucket as
/// Prometheus' `histogram_quantile` does; one in the +Inf bucket reads as the highest
/// bound. `None` when the histogram is empty.
pub fn quantile(cumulative: &[u64], q: f64) -> Option<f64> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let bucket = cumulative.iter().position(|&c| c as f64 >= rank)?;
    let lower = if bucket == 0 {
        0.0
    } else {
        CONNECT_BUCKETS[bucket - 1]
    };
    let Some(&upper) = CONNECT_BUCKETS.get(bucket) else {
        return Some(lower);
    };
    let below = if bucket == 0 {
        0
    } else {
        cumulative[bucket - 1]
    };
    let inside = (cumulative[bucket] - below) as f64;
    let fraction = if inside > 0.0 {
        (rank - below as f64) / inside
    } else {
        1.0
    };
    Some(lower + (upper - lower) * fraction)
}

// === impl EventStream ===

impl EventStream {
    /// A stream of the events newer than `last_event_id` (all the ring still holds
    /// when it is older) and of the view, until shutdown begins.
    pub fn new(
        proxy: Proxy,
        latency: Arc<LatencyHistory>,
        shutdown: Shutdown,
        last_event_id: u64,
    ) -> Self {
        let now = Instant::now();
        Self {
            start: Some(Streaming {
                proxy,
                latency,
                shutdown,
                ends: None,
                last_event_id,
                last_view: None,
                next_status: now,
                last_sent: now,
                started: false,
                said_goodbye: false,
            }),
            frames: None,
        }
    }

    /// Ends the stream at `ends`, with a last comment saying so.
    pub fn until(mut self, ends: Instant) -> Self {
        if let Some(start) = &mut self.start {
            start.ends = Some(ends);
        }
        self
    }
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(start) = this.start.take() {
            this.frames = Some(Box::pin(futures_util::stream::unfold(
                start,
                |mut s| async {
                    let frame = s.next_frame().await?;
                    Some((frame, s))
                },
            )));
        }
        match &mut this.frames {
            Some(frames) => frames
                .as_mut()
                .poll_next(cx)
                .map(|frame| frame.map(|bytes| Ok(Frame::data(bytes)))),
            None => Poll::Ready(None),
        }
    }
}

// === impl Streaming ===

impl Streaming {
    /// The next frame to send, waiting for there to be one; `None` ends the stream.
    async fn next_frame(&mut self) -> Option<Bytes> {
        let mut out = String::new();
        if !self.started {
            self.started = true;
            // Reconnect quickly: the page should not stay stale for long.
            out.push_str("retry: 1000\n\n");
            self.add_events(&mut out);
            self.add_view(&mut out, true).await;
            return Some(Bytes::from(out));
        }
        loop {
            let ends = self.ends;
            let overdue = async move {
                match ends {
                    Some(ends) => tokio::time::sleep_until(ends).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.stopping() => return None,
                _ = overdue => {
                    if self.said_goodbye {
                        return None;
                    }
                    self.said_goodbye = true;
                    return Some(Bytes::from_static(
                        b": this stream has run its time; reconnect\n\n",
                    ));
                }
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            let now = Instant::now();
            let had_events = self.add_events(&mut out);
            if had_events || now >= self.next_status {
                self.add_view(&mut out, had_events).await;
            }
            if out.is_empty() && now.duration_since(self.last_sent) >= KEEP_ALIVE {
                out.push_str(": keep-alive\n\n");
            }
            if !out.is_empty() {
                self.last_sent = now;
                return Some(Bytes::from(out));
            }
        }
    }

    /// Appends the events newer than the last one sent; whether there were any.
    fn add_events(&mut self, out: &mut String) -> bool {
        let events = self.proxy.events.since(self.last_event_id);
        for e in &events {
            let data = serde_json::to_string(&EventView::from(e)).unwrap_or_default();
            let _ = write!(out, "id: {}\nevent: event\ndata: {data}\n\n", e.id);
            self.last_event_id = e.id;
        }
        !events.is_empty()
    }

    /// Appends the view when it changed since the last one sent, or when `always`.
    async fn add_view(&mut self, out: &mut String, always: bool) {
        self.next_status = Instant::now() + STATUS_INTERVAL;
        let Ok(view) = PageView::take(&self.proxy, &self.latency).await else {
            return;
        };
        // The clock and the latency window move every second; alone, they are no
        // change worth a frame.
        let mut comparable = view.clone();
        comparable.now_unix_ms = 0;
        for pool in &mut comparable.pools {
            pool.connect.window_seconds = 0;
        }
        if !always && self.last_view.as_ref() == Some(&comparable) {
            return;
        }
        self.last_view = Some(comparable);
        let data = serde_json::to_string(&view).unwrap_or_default();
        let _ = write!(out, "event: status\ndata: {data}\n\n");
    }
}

/// `template` with each `{{key}}` replaced by its value. One pass, so that a value
/// that happens to contain a `{{key}}` of its own stays as it is.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        match after.find("}}").and_then(|close| {
            values
                .iter()
                .find(|(k, _)| *k == &after[..close])
                .map(|(_, v)| (close, v))
        }) {
            Some((close, value)) => {
                out.push_str(value);
                rest = &after[close + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `text` made safe inside HTML text and double-quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "12 s ago" and the like; the script keeps these current.
fn ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    let seconds = now_unix_ms.saturating_sub(then_unix_ms) / 1000;
    match seconds {
        0..=59 => format!("{seconds} s ago"),
        60..=3599 => format!("{} min ago", seconds / 60),
        3600..=86_399 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cumulative(per_bucket: &[(usize, u64)]) -> Vec<u64> {
        let mut counts = vec![0u64; CONNECT_BUCKETS.len() + 1];
        for &(bucket, n) in per_bucket {
            counts[bucket] += n;
        }
        let mut running = 0;
        counts
            .iter()
            .map(|c| {
                running += c;
                running
            })
            .collect()
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        assert_eq!(quantile(&cumulative(&[]), 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
        // 100 in the first bucket (0..0.5 ms): the median is halfway.
        let all_fast = cumulative(&[(0, 100)]);
        assert!((quantile(&all_fast, 0.5).unwrap() - 0.00025).abs() < 1e-9);
        // 98 fast, 2 in (0.5 s, 1 s]: p99 is in the slow bucket, halfway through it.
        let slow_tail = cumulative(&[(0, 98), (10, 2)]);
        let p99 = quantile(&slow_tail, 0.99).unwrap();
        assert!((p99 - 0.75).abs() < 1e-9, "{p99}");
        assert!(quantile(&slow_tail, 0.5).unwrap() < 0.0005);
        // Beyond the last bound: the last bound, not infinity.
        let hung = cumulative(&[(CONNECT_BUCKETS.len(), 5)]);
        assert_eq!(quantile(&hung, 0.5), Some(10.0));
    }

    #[test]
    fn latency_is_the_difference_from_the_oldest_sample() {
        let history = LatencyHistory::default();
        let start = Instant::now();
        let before = cumulative(&[(0, 1000)]);
        history.push(start, HashMap::from([("p".to_string(), before)]));
        for i in 1..=LATENCY_SAMPLES {
            history.push(start + LATENCY_SAMPLE_EVERY * i as u32, HashMap::new());
        }
        // The first sample went; the second has no counts for p, so all counts count.
        let now = cumulative(&[(0, 1000), (8, 10)]);
        let view = history.last_minute("p", &now, start + Duration::from_secs(61));
        assert_eq!(view.count, 1010);

        let history = LatencyHistory::default();
        history.push(
            start,
            HashMap::from([("p".to_string(), cumulative(&[(0, 1000)]))]),
        );
        let view = history.last_minute("p", &now, start + Duration::from_secs(30));
        assert_eq!(view.count, 10, "only the new ones");
        assert_eq!(view.window_seconds, 30);
        let p50 = view.p50_ms.unwrap();
        assert!((100.0..=250.0).contains(&p50), "{p50}");

        let reset = cumulative(&[(0, 3)]);
        let view = history.last_minute("p", &reset, start + Duration::from_secs(30));
        assert_eq!(
            view.count, 3,
            "counts below the base: the pool started over"
        );
    }

    #[test]
    fn fill_replaces_each_key_once_and_leaves_the_rest() {
        assert_eq!(
            fill("a{{x}}b{{y}}c{{z}}{{", &[("x", "{{y}}"), ("y", "2")]),
            "a{{y}}b2c{{z}}{{"
        );
    }

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("<img src=x onerror='a'>&\""),
            "&lt;img src=x onerror=&#39;a&#39;&gt;&amp;&quot;"
        );
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(10_000, 10_000), "0 s ago");
        assert_eq!(
            ago(10_000, 20_000),
            "0 s ago",
            "a clock step back is no panic"
        );
        assert_eq!(ago(130_000, 10_000), "2 min ago");
        assert_eq!(ago(4 * 3_600_000, 0), "4 h ago");
    }
}
