//! One batch of spans, encoded into its export request as the spans arrive.
//!
//! Why as they arrive: encoding a whole batch at once (512 spans, about 1.5 million
//! instructions) ran in one burst on a CPU the Varnish workers share, which showed in their p99
//! latency. Encoded as they come, each exporter tick encodes what came since the last one, and
//! the span record goes back to the pool at once (`span_pool`), instead of after the batch was
//! sent. A failed send is retried from the bytes.
//!
//! Threading: the exporter thread only.

use std::time::Instant;

use super::otlp_json::{self, Resource};
use super::otlp_proto::RequestWriter;
use crate::span::SpanRecord;

/// How a batch is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// OTLP protobuf (OTLP/HTTP protobuf, gRPC).
    Protobuf,
    /// OTLP JSON; `line`: one line, ended by a newline (the file and stdout outputs).
    Json { line: bool },
    /// Not written at all (`OTEL_TRACES_EXPORTER=none`): only counted.
    Nothing,
}

enum Body {
    Protobuf { bytes: Vec<u8>, writer: RequestWriter },
    Json { text: String, line: bool, ended: bool },
    Nothing,
}

/// Buffers of finished batches, kept for the next ones.
#[derive(Default)]
pub struct Spare {
    bytes: Vec<u8>,
    text: String,
}

/// A batch's buffer is kept for the next batch up to this size: a 512-span batch of sampled hits
/// takes about 400 KB; one of spans with many long attributes can take megabytes.
pub const MAX_KEPT_BUFFER: usize = 4 << 20;

pub struct Batch {
    body: Body,
    spans: usize,
    /// When its first span came (for `OTEL_BSP_SCHEDULE_DELAY`).
    pub first_at: Option<Instant>,
}

impl Batch {
    /// An empty batch, in the buffer `spare` holds for this encoding.
    pub fn new(encoding: Encoding, resource: &Resource, spare: &mut Spare) -> Batch {
        let body = match encoding {
            Encoding::Protobuf => {
                let mut bytes = std::mem::take(&mut spare.bytes);
                let writer = RequestWriter::begin(&mut bytes, resource);
                Body::Protobuf { bytes, writer }
            }
            Encoding::Json { line } => {
                let mut text = std::mem::take(&mut spare.text);
                text.clear();
                otlp_json::begin_export_request(&mut text, resource);
                Body::Json { text, line, ended: false }
            }
            Encoding::Nothing => Body::Nothing,
        };
        Batch { body, spans: 0, first_at: None }
    }

    pub fn len(&self) -> usize {
        self.spans
    }

    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Encodes `span` into the batch. Returns false if encoding panicked (a bug): the span is
    /// then left out, and the batch is as it was before.
    pub fn push(&mut self, span: &SpanRecord) -> bool {
        let first = self.spans == 0;
        let encoded = match &mut self.body {
            Body::Protobuf { bytes, writer } => {
                // The writer moves on only once the span is complete.
                let mut next = *writer;
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| next.push(bytes, span))).is_ok();
                if done {
                    *writer = next;
                }
                done
            }
            // (Never after `request`: a batch leaves `filling` before it is sent.)
            Body::Json { text, .. } => {
                let before = text.len();
                let done =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| otlp_json::push_span(text, first, span)))
                        .is_ok();
                if !done {
                    text.truncate(before);
                }
                done
            }
            Body::Nothing => true,
        };
        if encoded {
            self.spans += 1;
            self.first_at.get_or_insert_with(Instant::now);
        }
        encoded
    }

    /// The request to send: the batch's buffer, and where the request is in it. May be called
    /// again for a retry (it returns the same request).
    pub fn request(&mut self, resource: &Resource) -> Request<'_> {
        match &mut self.body {
            Body::Protobuf { bytes, writer } => {
                let range = writer.finish(bytes, resource);
                Request::Protobuf { bytes, range }
            }
            Body::Json { text, line, ended } => {
                if !*ended {
                    otlp_json::end_export_request(text);
                    if *line {
                        text.push('\n');
                    }
                    *ended = true;
                }
                Request::Json(text)
            }
            Body::Nothing => Request::Nothing,
        }
    }

    /// Gives the batch's buffer back for the next batch (unless it grew unusually large).
    pub fn recycle(self, spare: &mut Spare) {
        match self.body {
            Body::Protobuf { bytes, .. } if bytes.capacity() <= MAX_KEPT_BUFFER => spare.bytes = bytes,
            Body::Json { text, .. } if text.capacity() <= MAX_KEPT_BUFFER => spare.text = text,
            _ => {}
        }
    }
}

/// A batch's export request, as `Batch::request` gives it.
pub enum Request<'a> {
    /// `bytes[range]`; the buffer itself is lent to the HTTP client (it keeps its length).
    Protobuf {
        bytes: &'a mut Vec<u8>,
        range: std::ops::Range<usize>,
    },
    Json(&'a mut String),
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::otlp_proto;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{Attribute, SpanKind, Value, ValueRef};

    fn resource() -> Resource {
        Resource { attributes: vec![("service.name".into(), "varnish".into())] }
    }

    fn span(n: u8) -> SpanRecord {
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([n; 16]), SpanId([n; 8]), None);
        r.add("url.path", ValueRef::Str(&format!("/{n}")));
        r.start_unix_nano = 1;
        r.end_unix_nano = 2;
        r
    }

    #[test]
    fn a_batch_encoded_span_by_span_is_the_batch_encoded_at_once() {
        let spans: Vec<SpanRecord> = (1..=40).map(span).collect();
        let res = resource();
        let mut spare = Spare::default();
        for round in 0..3 {
            // The buffers of the earlier rounds are reused, bigger than needed the second time.
            let spans = &spans[..if round == 1 { 3 } else { 40 }];
            let mut proto = Batch::new(Encoding::Protobuf, &res, &mut spare);
            let mut json = Batch::new(Encoding::Json { line: true }, &res, &mut spare);
            for s in spans {
                assert!(proto.push(s) && json.push(s));
            }
            assert_eq!((proto.len(), json.len()), (spans.len(), spans.len()));
            let expected = otlp_proto::export_request(&res, spans);
            for _attempt in 0..2 {
                // A retry sends the same request again.
                let Request::Protobuf { bytes, range } = proto.request(&res) else { panic!("protobuf") };
                assert_eq!(&bytes[range], &expected[..]);
                let Request::Json(text) = json.request(&res) else { panic!("json") };
                assert_eq!(*text, format!("{}\n", otlp_json::export_request(&res, spans)));
            }
            proto.recycle(&mut spare);
            json.recycle(&mut spare);
        }
        assert!(!spare.bytes.is_empty() && !spare.text.is_empty(), "buffers kept for the next batch");
    }

    #[test]
    fn nothing_is_only_counted() {
        let mut batch = Batch::new(Encoding::Nothing, &resource(), &mut Spare::default());
        assert!(batch.is_empty() && batch.first_at.is_none());
        assert!(batch.push(&span(1)));
        assert_eq!(batch.len(), 1);
        assert!(batch.first_at.is_some());
        assert!(matches!(batch.request(&resource()), Request::Nothing));
    }

    #[test]
    fn an_oversized_buffer_is_not_kept() {
        let mut spare = Spare::default();
        let mut batch = Batch::new(Encoding::Json { line: false }, &resource(), &mut spare);
        let mut big = span(1);
        // Past the value length limit that `add` and `set` apply: straight into the array.
        big.attributes.push(Attribute { key: "big".into(), value: Value::Str("x".repeat(MAX_KEPT_BUFFER + 1).into()) });
        assert!(batch.push(&big));
        batch.recycle(&mut spare);
        assert_eq!(spare.text.capacity(), 0);
    }
}
