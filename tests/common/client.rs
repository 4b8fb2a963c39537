//! Clients: read a greeting, round-trip an echo, notice a close.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SOON;

/// Reads one line (without the newline) from a fresh connection's greeting.
pub async fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 || byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Connects, sends `payload`, reads the same number of bytes back and checks them.
pub async fn echo_round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// True when the peer closed: a read returns EOF or an error.
pub async fn is_closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Connects through the proxy and returns the upstream's greeting name (`hello NAME`).
pub async fn greeted_by(addr: SocketAddr) -> std::io::Result<String> {
    switchyard::drill::greeting(addr, SOON)
        .await
        .map_err(std::io::Error::other)
}

/// A new client every 5 ms against `addr`, each reading the greeting, until the token
/// is cancelled (a minute at most): the load an upgrade must not fail.
pub fn greeting_clients(
    addr: SocketAddr,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<switchyard::drill::Timeline>,
) {
    use switchyard::drill::{ClientStream, Probe, Stop};
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = tokio::spawn(
        ClientStream {
            addr,
            every: Duration::from_millis(5),
            limit: Duration::from_secs(60),
            client_timeout: Duration::from_secs(5),
            probe: Probe::Greeting {
                speaks_first: false,
            },
        }
        .run(Stop::On(stop.clone())),
    );
    (stop, clients)
}
