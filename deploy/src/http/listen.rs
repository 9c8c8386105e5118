//! Serving a router on a socket with the limits every mangrove server applies ([`HttpLimits`]):
//! hyper's HTTP/1 header-read timeout (which also closes idle keep-alive connections: hyper
//! restarts it whenever a connection waits for its next request), tower-http's request-body and
//! whole-request timeouts, axum's body size limit, and a cap on open connections (at the cap the
//! server stops accepting until one closes, so the kernel's backlog holds the rest). Shutdown is
//! graceful (hyper-util): no new connections, in-flight ones drain for at most `drain`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

/// Time and size limits of one HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time a client has to send a request's headers; also how long an idle keep-alive
    /// connection is kept open. A slow client is disconnected after it.
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// Longest time from a request's arrival to its response head (408 beyond). A streamed
    /// response's body is not bounded by it.
    pub request_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// How long shutdown waits for in-flight connections.
    pub drain: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            max_connections: 1024,
            max_body_bytes: 2 << 20,
            drain: Duration::from_secs(10),
        }
    }
}

/// Errors of a server's limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error("{name} must be positive")]
    Zero { name: &'static str },
}

impl HttpLimits {
    /// Checks no limit is zero (a zero timeout or cap would refuse everything).
    pub fn validate(&self) -> Result<(), LimitsError> {
        let zero = [
            ("--header-timeout", self.header_timeout.is_zero()),
            ("--body-timeout", self.body_timeout.is_zero()),
            ("--request-timeout", self.request_timeout.is_zero()),
            ("--max-connections", self.max_connections == 0),
            ("--max-body-bytes", self.max_body_bytes == 0),
        ];
        match zero.iter().find(|(_, z)| *z) {
            Some((name, _)) => Err(LimitsError::Zero { name }),
            None => Ok(()),
        }
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
        .service(router.layer(DefaultBodyLimit::max(limits.max_body_bytes)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, keep serving the open ones.
                    eprintln!("mangrove http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone())));
        tokio::spawn(async move {
            // A timed-out or reset connection is the client's problem, not the server's.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown()).await.is_err() {
        eprintln!("mangrove http: {} s drain over, closing the remaining connections", limits.drain.as_secs());
    }
    Ok(())
}
