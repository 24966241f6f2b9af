//! The HTTP routes.
//!
//! | route          | answer                                                     |
//! |----------------|------------------------------------------------------------|
//! | `GET /`        | `hello from demo-server\n` (the benchmark target)          |
//! | `GET /healthz` | `ok\n`                                                     |
//! | `GET /whoami`  | JSON [`crate::whoami::Report`]                             |
//! | `POST /echo`   | the request body, streamed back as it arrives              |
//! | other methods on those paths | 405 with `Allow`                             |
//! | anything else  | 404                                                        |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::whoami::{self, Report};

/// Response body: fixed bytes, or the request body itself for `/echo`. An `Either` rather than a
/// boxed body keeps the `/` path free of allocations beyond what hyper itself does.
pub type Body = Either<Full<Bytes>, Incoming>;

const HELLO: &[u8] = b"hello from demo-server\n";
const OK: &[u8] = b"ok\n";
const NOT_FOUND: &[u8] = b"not found\n";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// What a handler knows about the connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Whether the listener was inherited through socket activation.
    pub activated: bool,
}

/// Answers one request. Never fails: every outcome is an HTTP response.
pub async fn handle(req: Request<Incoming>, conn: ConnInfo) -> Result<Response<Body>, Infallible> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let response = match req.uri().path() {
        "/" if get => text(StatusCode::OK, HELLO),
        "/healthz" if get => text(StatusCode::OK, OK),
        "/whoami" if get => {
            let report = Report::gather(
                Path::new(whoami::PROC_ROOT),
                conn.local,
                conn.peer,
                conn.activated,
            );
            let mut res = Response::new(Either::Left(Full::new(Bytes::from(report.to_json()))));
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
            res
        }
        "/echo" if req.method() == Method::POST => echo(req),
        "/" | "/healthz" | "/whoami" => not_allowed("GET, HEAD"),
        "/echo" => not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, NOT_FOUND),
    };
    Ok(response)
}

/// Hands the request body to the response unread. hyper reads the request and writes the response
/// on the same connection concurrently, so bytes flow back while the upload is still arriving and
/// memory stays at one chunk whatever the size. With a Content-Length on the request the body's
/// size hint is exact and the response carries the same Content-Length; otherwise it is chunked.
fn echo(req: Request<Incoming>) -> Response<Body> {
    let content_type = req.headers().get(CONTENT_TYPE).cloned();
    let mut res = Response::new(Either::Right(req.into_body()));
    res.headers_mut().insert(
        CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    res
}

fn text(status: StatusCode, body: &'static [u8]) -> Response<Body> {
    let mut res = Response::new(Either::Left(Full::new(Bytes::from_static(body))));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT));
    res
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut res = text(StatusCode::METHOD_NOT_ALLOWED, b"method not allowed\n");
    res.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    res
}
