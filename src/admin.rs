//! The admin API (SPEC §5): HTTP/1.1 and JSON, on its own listener.
//!
//! A flat router: one match on (method, path) picks the endpoint; 404 for an unknown
//! path, 405 for a known path with the wrong method, 401 when a POST request lacks
//! the bearer token, 400 for malformed input, all with a JSON error body. HEAD is
//! served wherever GET is. Handlers only read snapshots and counters, or ask the
//! controller and the reloader by message; they never touch live state directly.
//! Request bodies are never read. The listener and its bounds live in `server`, the
//! live page and its event stream in `page`.

mod metrics;
mod page;
mod server;

pub use page::{KEEP_ALIVE, POLL_INTERVAL, STATUS_INTERVAL};
pub use server::{
    EVICTION_GRACE, HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_HEADER_BYTES, MIN_CONNECTIONS,
    STREAM_CLOSE_GRACE, STREAM_LIFETIME, connection_cap_for, stream_cap_for,
};

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::Proxy;
use crate::config::AdminConfig;
use crate::controller::ControlError;
use crate::error::StartError;
use crate::events::Event;
use crate::health::state::AdminOverride;
use crate::reload::{ReloadError, Reloader};
use crate::shutdown::Shutdown;
use crate::status::{ListenerView, StatusView};

/// What the handlers need.
#[derive(Debug)]
pub struct Admin {
    proxy: Proxy,
    reloader: Arc<Reloader>,
    latency: Arc<page::LatencyHistory>,
}

/// The endpoints, each with the one method it accepts.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Page,
    EventStream,
    Livez,
    Readyz,
    Status,
    Events,
    Metrics,
    SetState {
        pool: String,
        upstream: String,
        state: Option<AdminOverride>,
    },
    Failback {
        pool: String,
    },
    Reload,
}

/// One event as `/events` shows it.
#[derive(Debug, Serialize)]
struct EventView<'a> {
    id: u64,
    at_unix_ms: u64,
    kind: &'static str,
    pool: &'a str,
    upstream: Option<&'a str>,
    old: &'a str,
    new: &'a str,
    reason: &'a str,
}

type HttpResponse = Response<Full<Bytes>>;

/// A handler's answer: whole, or an event stream that the server admits and bounds.
enum Reply {
    Whole(HttpResponse),
    Stream(Response<page::EventStream>),
}

// === impl Admin ===

impl Admin {
    /// The token file comes from the reloader, which keeps it current across reloads.
    pub fn new(proxy: Proxy, reloader: Arc<Reloader>) -> Self {
        Self {
            proxy,
            reloader,
            latency: Arc::default(),
        }
    }

    /// Checks that the token file is readable, so that a bad admin setup fails the
    /// start instead of the first request.
    pub fn check_token_file(config: &AdminConfig) -> Result<(), StartError> {
        if let Some(path) = &config.token_file {
            read_token(path)
                .map_err(|e| StartError::Admin(format!("token_file {}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Serves on `listener` until shutdown begins.
    pub fn spawn(self: Arc<Self>, listener: Arc<TcpListener>, shutdown: Shutdown) {
        if self.reloader.admin_token_file().is_none() {
            let addr = listener
                .local_addr()
                .map_or_else(|_| "its address".to_string(), |a| a.to_string());
            warn!(
                "the admin API has no token_file: anyone who can connect to {addr} can drain, put in maint, fail back and reload; set [admin] token_file"
            );
        }
        tokio::spawn(
            self.latency
                .clone()
                .sample(self.proxy.clone(), shutdown.clone()),
        );
        server::spawn(self, listener, shutdown);
    }

    /// Answers one request; `shutdown` ends event streams.
    async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        shutdown: &Shutdown,
    ) -> Reply {
        let (request, _) = request.into_parts();
        if Route::parse(request.uri.path()) == Ok(Some(Route::EventStream))
            && request.method == Method::GET
        {
            return Reply::Stream(self.event_stream(&request, shutdown));
        }
        Reply::Whole(self.answer(request, peer).await)
    }

    /// Answers a request with a whole response. A HEAD gets the GET answer; hyper
    /// sends its status and headers, `Content-Length` included, without the body.
    async fn answer(&self, request: hyper::http::request::Parts, peer: SocketAddr) -> HttpResponse {
        // No endpoint takes a body: dropping it (done by the caller) lets hyper discard
        // what already arrived and close the connection after the answer rather than
        // read on.
        let method = &request.method;
        let path = request.uri.path();
        let route = match Route::parse(path) {
            Ok(Some(route)) => route,
            Ok(None) => return error(StatusCode::NOT_FOUND, "no such endpoint"),
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        let allowed = route.method();
        let read_only = allowed == Method::GET;
        if method != allowed && !(read_only && method == Method::HEAD) {
            let allow = if read_only {
                "GET, HEAD"
            } else {
                allowed.as_str()
            };
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} is not allowed here; use {allow}"),
            );
            if let Ok(value) = allow.parse() {
                response.headers_mut().insert(ALLOW, value);
            }
            return response;
        }
        if !read_only {
            if let Some(response) = self.refuse_unauthorized(&request.headers) {
                // A client guessing tokens must not be able to flood the log.
                static REFUSALS: crate::error::Throttle = crate::error::Throttle::new();
                if let Some(suppressed) = REFUSALS.allow_now(std::time::Duration::from_secs(10)) {
                    warn!(%peer, path, suppressed, "admin request refused: missing or wrong token (one warning per 10s at most)");
                }
                return response;
            }
            info!(%peer, path, "admin request");
        }
        match route {
            Route::Page => self.page().await,
            // A HEAD: the headers a GET would get, without starting a stream.
            Route::EventStream => {
                let mut response = Response::new(Full::new(Bytes::new()));
                set_event_stream_headers(response.headers_mut());
                response
            }
            Route::Livez => json_response(StatusCode::OK, &json!({ "status": "ok" })),
            Route::Readyz => self.readyz(),
            Route::Status => self.status().await,
            Route::Events => self.events(request.uri.query()),
            Route::Metrics => {
                let body = metrics::render(&self.proxy, &self.reloader.stats);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                if let Ok(value) = "text/plain; version=0.0.4; charset=utf-8".parse() {
                    response.headers_mut().insert(CONTENT_TYPE, value);
                }
                response
            }
            Route::SetState {
                pool,
                upstream,
                state,
            } => match self
                .proxy
                .controller
                .set_admin(&pool, &upstream, state)
                .await
            {
                Ok(now) => json_response(
                    StatusCode::OK,
                    &json!({ "pool": pool, "upstream": upstream, "state": now.as_str() }),
                ),
                Err(e) => control_error(&e),
            },
            Route::Failback { pool } => match self.proxy.controller.failback(&pool).await {
                Ok(priority) => json_response(
                    StatusCode::OK,
                    &json!({ "pool": pool, "active_tier": priority }),
                ),
                Err(e) => control_error(&e),
            },
            Route::Reload => match self.reloader.reload().await {
                Ok(diff) => {
                    json_response(StatusCode::OK, &json!({ "result": "ok", "changes": diff }))
                }
                Err(e) => {
                    let status = match e {
                        ReloadError::Config(_) => StatusCode::BAD_REQUEST,
                        ReloadError::Bind(_) | ReloadError::Stopped => {
                            StatusCode::INTERNAL_SERVER_ERROR
                        }
                    };
                    json_response(
                        status,
                        &json!({ "result": "error", "error": e.to_string() }),
                    )
                }
            },
        }
    }

    /// Every POST needs `Authorization: Bearer <token>` when a token file is
    /// configured; returns the refusal when it is missing or wrong. The file is read
    /// per request so that rotating the token needs no reload, and which file (if any)
    /// is the reloaded config's.
    fn refuse_unauthorized(&self, headers: &HeaderMap) -> Option<HttpResponse> {
        let path = self.reloader.admin_token_file()?;
        let expected = match read_token(&path) {
            Ok(token) => token,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the admin token file");
                return Some(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the admin token file cannot be read",
                ));
            }
        };
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            None
        } else {
            Some(error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
            ))
        }
    }

    fn readyz(&self) -> HttpResponse {
        let snapshot = self.proxy.snapshot.load();
        let mut without: Vec<&str> = snapshot
            .pools()
            .filter(|p| p.active_tier.is_none())
            .map(|p| p.config.name.as_str())
            .collect();
        without.sort_unstable();
        let status = if without.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &json!({ "ready": without.is_empty(), "pools_without_usable_upstream": without }),
        )
    }

    async fn status(&self) -> HttpResponse {
        let pools = match self.proxy.controller.status().await {
            Ok(pools) => pools,
            Err(e) => return control_error(&e),
        };
        let listeners = listener_views(&self.proxy);
        json_response(
            StatusCode::OK,
            &StatusView {
                pid: std::process::id(),
                listeners,
                pools,
            },
        )
    }

    async fn page(&self) -> HttpResponse {
        let view = match page::PageView::take(&self.proxy, &self.latency).await {
            Ok(view) => view,
            Err(e) => return control_error(&e),
        };
        // Newer events than the view reach the page through its stream.
        let mut events = self.proxy.events.all();
        events.retain(|e| e.id <= view.last_event_id);
        let html = view.render_page(&events);
        let mut response = Response::new(Full::new(Bytes::from(html)));
        let headers = response.headers_mut();
        if let Ok(value) = "text/html; charset=utf-8".parse() {
            headers.insert(CONTENT_TYPE, value);
        }
        if let Ok(value) = "no-store".parse() {
            headers.insert(CACHE_CONTROL, value);
        }
        // Nothing from elsewhere, nothing inline but our own script and style.
        if let Ok(value) = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'".parse() {
            headers.insert(hyper::header::CONTENT_SECURITY_POLICY, value);
        }
        response
    }

    /// The stream resumes after `Last-Event-ID` (what a reconnecting browser sends),
    /// else after `?since=`, else from now on.
    fn event_stream(
        &self,
        request: &hyper::http::request::Parts,
        shutdown: &Shutdown,
    ) -> Response<page::EventStream> {
        let from_header = request
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let from_query = query_value(request.uri.query(), "since").and_then(|v| v.parse().ok());
        let last_event_id = from_header
            .or(from_query)
            .unwrap_or_else(|| self.proxy.events.since(0).last().map_or(0, |e| e.id));
        let stream = page::EventStream::new(
            self.proxy.clone(),
            self.latency.clone(),
            shutdown.clone(),
            last_event_id,
        );
        let mut response = Response::new(stream);
        set_event_stream_headers(response.headers_mut());
        response
    }

    fn events(&self, query: Option<&str>) -> HttpResponse {
        let mut since = 0;
        for (key, value) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
        {
            if key == "since" {
                match value.parse::<u64>() {
                    Ok(id) => since = id,
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "since={value:?} is not an event id; use a non-negative integer"
                            ),
                        );
                    }
                }
            }
        }
        let events = self.proxy.events.since(since);
        let views: Vec<EventView> = events.iter().map(EventView::from).collect();
        json_response(StatusCode::OK, &json!({ "events": views }))
    }
}

// === impl Route ===

impl Route {
    /// `Ok(None)` for an unknown path, `Err` for a known one with malformed parts.
    fn parse(path: &str) -> Result<Option<Self>, String> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let route = match segments.as_slice() {
            [""] => Route::Page,
            ["events", "stream"] => Route::EventStream,
            ["livez"] => Route::Livez,
            ["readyz"] => Route::Readyz,
            ["status"] => Route::Status,
            ["events"] => Route::Events,
            ["metrics"] => Route::Metrics,
            ["reload"] => Route::Reload,
            ["pools", pool, "failback"] => Route::Failback {
                pool: percent_decode(pool)?,
            },
            ["pools", pool, "upstreams", upstream, action] => Route::SetState {
                pool: percent_decode(pool)?,
                upstream: percent_decode(upstream)?,
                state: match *action {
                    "up" => None,
                    "drain" => Some(AdminOverride::Drain),
                    "maint" => Some(AdminOverride::Maint),
                    _ => return Ok(None),
                },
            },
            _ => return Ok(None),
        };
        Ok(Some(route))
    }

    fn method(&self) -> Method {
        match self {
            Route::Page
            | Route::EventStream
            | Route::Livez
            | Route::Readyz
            | Route::Status
            | Route::Events
            | Route::Metrics => Method::GET,
            Route::SetState { .. } | Route::Failback { .. } | Route::Reload => Method::POST,
        }
    }
}

impl<'a> From<&'a Event> for EventView<'a> {
    fn from(e: &'a Event) -> Self {
        Self {
            id: e.id,
            at_unix_ms: e.at_unix_ms,
            kind: e.kind.as_str(),
            pool: &e.pool,
            upstream: e.upstream.as_deref(),
            old: &e.old,
            new: &e.new,
            reason: &e.reason,
        }
    }
}

/// A GET against a running instance's admin API (for `switchyard status`). `addr` is
/// `host:port`, optionally with a leading `http://`. Returns the status code and body.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    request(addr, Method::GET, path, None).await
}

/// Sends a request without a body to the admin API at `addr`, with the bearer `token`
/// when given; returns the status code and the body. Each step is bounded in time.
pub async fn request(
    addr: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let authority = addr.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority),
    )
    .await
    .map_err(|_| format!("cannot reach the admin API at {authority}: timed out"))?
    .map_err(|e| format!("cannot reach the admin API at {authority}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("admin API at {authority}: {e}"))?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority);
    if let Some(token) = token {
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = builder
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("admin API at {authority}: no answer within 10s"))?
        .map_err(|e| format!("admin API at {authority}: {e}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Every listener as `/status` and the page show it.
fn listener_views(proxy: &Proxy) -> Vec<ListenerView> {
    use std::sync::atomic::Ordering::Relaxed;
    let snapshot = proxy.snapshot.load();
    proxy
        .listeners
        .views()
        .into_iter()
        .map(|l| {
            let stats = &l.context.stats;
            ListenerView {
                pool: snapshot
                    .listener_pool(&l.context.name)
                    .unwrap_or("")
                    .to_string(),
                name: l.context.name.clone(),
                binds: l.addrs.iter().map(ToString::to_string).collect(),
                connections_active: stats.connections_active.load(Relaxed),
                connections_total: stats.connections_total.load(Relaxed),
                connections_failed: stats.connections_failed.load(Relaxed),
                max_connections: l.context.max_connections().map(|m| m.get()),
            }
        })
        .collect()
}

fn set_event_stream_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        (CONTENT_TYPE, "text/event-stream"),
        (CACHE_CONTROL, "no-store"),
        // Tells nginx-like reverse proxies not to hold the frames back.
        (
            hyper::header::HeaderName::from_static("x-accel-buffering"),
            "no",
        ),
        // A browser opens a new connection for its next stream anyway: closing this
        // one when the stream ends gives its slot back at once.
        (hyper::header::CONNECTION, "close"),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
}

/// The value of `key` in a query string, undecoded.
fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn control_error(e: &ControlError) -> HttpResponse {
    let status = match e {
        ControlError::NoSuchPool(_) | ControlError::NoSuchUpstream { .. } => StatusCode::NOT_FOUND,
        ControlError::AlreadyBest { .. }
        | ControlError::NothingUsable(_)
        | ControlError::AmbiguousUpstream { .. } => StatusCode::CONFLICT,
        ControlError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, &e.to_string())
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": message }))
}

fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    let body = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = "application/json".parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// A token file's token: bounded in size, trimmed, not empty.
pub fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    let bytes = crate::files::read_bounded(path, crate::files::MAX_SECRET_FILE)?;
    let token = String::from_utf8_lossy(&bytes).trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::other("the file is empty"));
    }
    Ok(token)
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive and one or more spaces may follow it (RFC 9110 §11.4).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("Bearer") {
        return None;
    }
    Some(rest.trim_start_matches(' '))
}

/// Whether the presented token is the expected one, in time that depends on the
/// presented length only: every presented byte is compared (with the expected bytes
/// repeated under it) and the length mismatch is folded into the result, so neither a
/// matching prefix nor the expected length shows in the response time.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut difference = presented.len() ^ expected.len();
    for (p, e) in presented.iter().zip(expected.iter().cycle()) {
        difference |= usize::from(p ^ e);
    }
    std::hint::black_box(difference) == 0
}

/// Decodes `%XX` escapes (an upstream address like `10.0.0.1%3A5432`).
fn percent_decode(segment: &str) -> Result<String, String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{segment:?} has a malformed %-escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{segment:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_decode() {
        assert_eq!(Route::parse("/livez"), Ok(Some(Route::Livez)));
        assert_eq!(Route::parse("/nope"), Ok(None));
        assert_eq!(Route::parse("/pools/pg/upstreams/a/explode"), Ok(None));
        assert_eq!(
            Route::parse("/pools/pg/upstreams/10.0.0.1%3A5432/drain"),
            Ok(Some(Route::SetState {
                pool: "pg".into(),
                upstream: "10.0.0.1:5432".into(),
                state: Some(AdminOverride::Drain),
            }))
        );
        assert!(Route::parse("/pools/pg/upstreams/%zz/up").is_err());
        assert_eq!(
            Route::parse("/reload").unwrap().unwrap().method(),
            Method::POST
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(
            !constant_time_eq(b"secretsecret", b"secret"),
            "a repetition of the token is not the token"
        );
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_with_any_number_of_spaces() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER    abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
