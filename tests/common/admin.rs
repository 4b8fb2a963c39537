//! The admin API over HTTP: requests, JSON, metrics.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// One HTTP/1.1 request with a real client; returns (status, body, allow header).
pub async fn http(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String, Option<String>) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    let stream = TcpStream::connect(addr).await.expect("connect to admin");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::<bytes::Bytes>::new()).expect("request"))
        .await
        .expect("HTTP response");
    let status = response.status().as_u16();
    let allow = response
        .headers()
        .get(hyper::header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), allow)
}

pub async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body, _) = http("GET", addr, path, None).await;
    assert!(
        status == 200 || status == 503,
        "GET {path}: {status} {body}"
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// `/metrics`, parsed by a Prometheus text parser.
pub async fn metrics(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body, _) = http("GET", admin, "/metrics", None).await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text")
}

/// The sum of every `/metrics` sample of `name` whose labels include `labels` (0 when
/// there is none): one sample when `labels` name it fully.
pub async fn metric_sum(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics(admin)
        .await
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The upstream named `name` of pool `pool` in `/status`.
pub fn upstream_status<'a>(
    status: &'a serde_json::Value,
    pool: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    status["pools"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == pool)?["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == name)
}
