//! One-shot HTTP(S) calls from the sidecar to its control plane and to JWKS endpoints:
//! a fresh connection, HTTP/1.1, a bounded body and an overall timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

/// GET `uri` (when `post` is `None`) or POST the JSON `post` to it. Returns the status and
/// at most `limit` bytes of body.
pub async fn call(
    uri: &str,
    post: Option<Bytes>,
    tls: &Arc<rustls::ClientConfig>,
    limit: usize,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("bad URI {uri}: {e}"))?;
    let host = parsed.host().ok_or("the URI has no host")?.to_owned();
    let https = parsed.scheme_str() == Some("https");
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let builder = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, host.as_str())
            .header(http::header::ACCEPT, "application/json");
        let req = match post {
            Some(body) => builder
                .method(http::Method::POST)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body)),
            None => builder
                .method(http::Method::GET)
                .body(Full::new(Bytes::new())),
        }
        .map_err(|e| e.to_string())?;
        let resp = if https {
            let name =
                rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            send(stream, req).await?
        } else {
            send(tcp, req).await?
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))?
}

async fn send<IO>(
    io: IO,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}
