//! OTLP/HTTP: `POST /v1/traces`, protobuf or JSON, optionally gzipped.

use std::borrow::Cow;
use std::convert::Infallible;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::net::TcpListener;

use crate::state::{count_spans, validate, Mode, Shared};

type Resp = Response<Full<Bytes>>;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("otlp-receiver: http accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let service = service_fn(move |req| handle(shared.clone(), req));
        tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}

#[derive(Clone, Copy)]
enum Format {
    Protobuf,
    Json,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (path, method) = (req.uri().path(), req.method());
    if path != "/v1/traces" {
        let msg = format!("no such path: {method} {path}");
        return Ok(reject(&shared, "http", StatusCode::NOT_FOUND, msg));
    }
    if method != Method::POST {
        let msg = format!("method not allowed: {method}");
        return Ok(reject(&shared, "http", StatusCode::METHOD_NOT_ALLOWED, msg));
    }
    shared.add(&shared.requests, 1);
    let mode = shared.mode();
    match mode {
        Mode::Refuse => {
            let resp = Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::RETRY_AFTER, "1")
                .body(Full::default());
            return Ok(resp.unwrap());
        }
        Mode::Blackhole => std::future::pending().await,
        Mode::Accept | Mode::Slow | Mode::Discard => {}
    }

    let content_type = header_str(&req, header::CONTENT_TYPE);
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    let (format, transport, response_type) = match media_type.to_ascii_lowercase().as_str() {
        "application/x-protobuf" => (Format::Protobuf, "http/protobuf", "application/x-protobuf"),
        "application/json" => (Format::Json, "http/json", "application/json"),
        _ => {
            let msg = format!("unsupported content-type: {content_type:?}");
            return Ok(reject(&shared, "http", StatusCode::UNSUPPORTED_MEDIA_TYPE, msg));
        }
    };
    let gzip = match header_str(&req, header::CONTENT_ENCODING).trim() {
        "" | "identity" => false,
        e if e.eq_ignore_ascii_case("gzip") => true,
        other => {
            let msg = format!("unsupported content-encoding: {other:?}");
            return Ok(reject(&shared, transport, StatusCode::UNSUPPORTED_MEDIA_TYPE, msg));
        }
    };

    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            let msg = format!("reading body: {e}");
            return Ok(reject(&shared, transport, StatusCode::BAD_REQUEST, msg));
        }
    };
    shared.add(&shared.bytes, body.len() as u64);
    let decoded = match gzip {
        true => gunzip(&body).map(Cow::Owned),
        false => Ok(Cow::Borrowed(&body[..])),
    };
    let result = decoded.and_then(|payload| match mode {
        Mode::Discard => count_cheaply(format, &payload),
        _ => decode(format, &payload).map(|request| {
            shared.record_request(transport, &parts.headers, gzip, &request);
            count_spans(&request)
        }),
    });
    match result {
        Ok(spans) => shared.add(&shared.spans, spans),
        Err(msg) => return Ok(reject(&shared, transport, StatusCode::BAD_REQUEST, msg)),
    }

    if mode == Mode::Slow {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // An empty ExportTraceServiceResponse in the request's encoding.
    let body = match format {
        Format::Protobuf => Bytes::new(),
        Format::Json => Bytes::from_static(b"{}"),
    };
    let resp = Response::builder().header(header::CONTENT_TYPE, response_type).body(Full::new(body));
    Ok(resp.unwrap())
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> String {
    let value = req.headers().get(name).map(|v| v.as_bytes()).unwrap_or_default();
    String::from_utf8_lossy(value).into_owned()
}

fn reject(shared: &Shared, transport: &str, status: StatusCode, msg: String) -> Resp {
    shared.record_error(transport, &msg);
    let resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(msg + "\n")));
    resp.unwrap()
}

fn gunzip(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::MultiGzDecoder::new(body);
    decoder.read_to_end(&mut out).map_err(|e| format!("gunzip: {e}"))?;
    Ok(out)
}

fn decode(format: Format, payload: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    match format {
        Format::Protobuf => ExportTraceServiceRequest::decode(payload).map_err(|e| format!("protobuf decode: {e}")),
        Format::Json => serde_json::from_slice(payload).map_err(|e| format!("json decode: {e}")),
    }
    .and_then(|request| validate(&request).map(|()| request))
}

/// Counts spans for --mode discard without building the messages: the nesting below
/// follows trace.proto, and everything inside a span is skipped unparsed.
fn count_cheaply(format: Format, payload: &[u8]) -> Result<u64, String> {
    match format {
        Format::Protobuf => {
            let req = lite::Request::decode(payload).map_err(|e| format!("protobuf decode: {e}"))?;
            let scopes = req.resource_spans.iter().flat_map(|r| &r.scope_spans);
            Ok(scopes.map(|s| s.spans.len() as u64).sum())
        }
        Format::Json => {
            let req: lite::JsonRequest = serde_json::from_slice(payload).map_err(|e| format!("json decode: {e}"))?;
            let scopes = req.resource_spans.iter().flat_map(|r| &r.scope_spans);
            Ok(scopes.map(|s| s.spans.len() as u64).sum())
        }
    }
}

mod lite {
    //! Just enough of ExportTraceServiceRequest to count spans.
    use serde::de::IgnoredAny;
    use serde::Deserialize;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<Skipped>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Skipped {}

    #[derive(Deserialize)]
    pub struct JsonRequest {
        #[serde(default, rename = "resourceSpans")]
        pub resource_spans: Vec<JsonResourceSpans>,
    }
    #[derive(Deserialize)]
    pub struct JsonResourceSpans {
        #[serde(default, rename = "scopeSpans")]
        pub scope_spans: Vec<JsonScopeSpans>,
    }
    #[derive(Deserialize)]
    pub struct JsonScopeSpans {
        #[serde(default)]
        pub spans: Vec<IgnoredAny>,
    }
}
