#[test]
fn stub() { let _ = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::default(); }
