//! OTLP/gRPC: tonic's generated TraceServiceServer, served over HTTP/2 by hyper.
//!
//! A thin wrapper in front of it applies refuse/blackhole before anything is read,
//! counts the body bytes as they arrive, and records the errors tonic answers by
//! itself (undecodable message, unknown method).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::codegen::Service;
use tonic::{Response, Status};

use crate::state::{count_spans, validate, Mode, Shared};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let grpc =
        TraceServiceServer::new(Receiver { shared: shared.clone() }).accept_compressed(CompressionEncoding::Gzip);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("otlp-receiver: grpc accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (shared, grpc) = (shared.clone(), grpc.clone());
        let service = service_fn(move |req| handle(shared.clone(), grpc.clone(), req));
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

async fn handle(
    shared: Arc<Shared>,
    mut grpc: TraceServiceServer<Receiver>,
    mut req: Request<Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mode = shared.mode();
    if req.uri().path() == EXPORT_PATH {
        shared.add(&shared.requests, 1);
        match mode {
            Mode::Refuse => return Ok(Status::unavailable("refuse mode").into_http()),
            Mode::Blackhole => std::future::pending().await,
            Mode::Accept | Mode::Slow | Mode::Discard => {}
        }
    }
    // The handler sees the same mode, even if --control changes it meanwhile.
    req.extensions_mut().insert(mode);
    let counter = shared.clone();
    let req = req.map(|body| {
        body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                counter.add(&counter.bytes, data.len() as u64);
            }
            frame
        })
    });
    let resp = grpc.call(req).await?;
    // Statuses tonic answers by itself (Export records its own): an undecodable
    // message is INTERNAL, an unknown method UNIMPLEMENTED, and so on.
    let status = resp.headers().get("grpc-status").map(|v| v.as_bytes());
    if let Some(code) = status.filter(|&c| !matches!(c, b"0" | b"3" | b"14")) {
        let message = resp.headers().get("grpc-message").map(|v| v.as_bytes());
        let error = format!(
            "grpc-status {}: {}",
            String::from_utf8_lossy(code),
            String::from_utf8_lossy(message.unwrap_or_default())
        );
        shared.record_error("grpc", &error);
    }
    Ok(resp)
}

struct Receiver {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let shared = &self.shared;
        let (metadata, extensions, request) = request.into_parts();
        let mode = extensions.get::<Mode>().copied().unwrap_or(Mode::Accept);
        if mode != Mode::Discard {
            if let Err(e) = validate(&request) {
                shared.record_error("grpc", &e);
                return Err(Status::invalid_argument(e));
            }
            let headers = metadata.into_headers();
            let gzip = headers.get("grpc-encoding").is_some_and(|v| v == "gzip");
            shared.record_request("grpc", &headers, gzip, &request);
        }
        shared.add(&shared.spans, count_spans(&request));
        if mode == Mode::Slow {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}
