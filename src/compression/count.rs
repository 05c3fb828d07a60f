//! Wire-byte counters: `gateway_body_bytes_total{side, direction}`, so the
//! bandwidth saved towards Zuora is visible next to what callers exchanged.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of `gateway_body_bytes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BodyLabels {
    /// `caller` or `zuora`.
    pub side: &'static str,
    /// `in` (received by the gateway) or `out` (sent by the gateway).
    pub direction: &'static str,
}

/// Body bytes on the wire, one counter per side and direction. Cheap to
/// clone (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct BodyMetrics {
    /// Request body bytes received from callers (as sent: compressed or not).
    pub caller_in: Counter,
    /// Response body bytes sent to callers.
    pub caller_out: Counter,
    /// Request body bytes sent to Zuora.
    pub zuora_out: Counter,
    /// Response body bytes received from Zuora (as sent: compressed or not).
    pub zuora_in: Counter,
}

impl BodyMetrics {
    /// Registers `gateway_body_bytes` (exposed as `gateway_body_bytes_total`).
    pub fn new(registry: &mut Registry) -> Self {
        let family = Family::<BodyLabels, Counter>::default();
        let get = |side, direction| family.get_or_create_owned(&BodyLabels { side, direction });
        let m = BodyMetrics {
            caller_in: get("caller", "in"),
            caller_out: get("caller", "out"),
            zuora_out: get("zuora", "out"),
            zuora_in: get("zuora", "in"),
        };
        registry.register(
            "gateway_body_bytes",
            "Body bytes on the wire, by side (caller, zuora) and direction (in: received, out: sent)",
            family,
        );
        m
    }
}

pin_project_lite::pin_project! {
    /// Adds the length of every data frame of `inner` to one or two counters.
    pub struct CountingBody<B> {
        #[pin]
        inner: B,
        first: Counter,
        second: Option<Counter>,
    }
}

impl<B> CountingBody<B> {
    /// Counts `inner`'s data bytes into `counter`.
    pub fn new(inner: B, counter: Counter) -> Self {
        CountingBody {
            inner,
            first: counter,
            second: None,
        }
    }

    /// Counts the same bytes into two counters (a body that crosses the
    /// gateway unchanged is on the wire on both sides).
    pub fn both(inner: B, first: Counter, second: Counter) -> Self {
        CountingBody {
            inner,
            first,
            second: Some(second),
        }
    }
}

impl<B> HttpBody for CountingBody<B>
where
    B: HttpBody,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            let n = data.remaining() as u64;
            this.first.inc_by(n);
            if let Some(second) = this.second {
                second.inc_by(n);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn counts_data_bytes_and_exposes_them_by_side_and_direction() {
        let mut registry = Registry::default();
        let m = BodyMetrics::new(&mut registry);
        let body = CountingBody::both(
            Full::new(Bytes::from_static(b"hello")),
            m.zuora_in.clone(),
            m.caller_out.clone(),
        );
        assert_eq!(body.size_hint().exact(), Some(5));
        body.collect().await.unwrap();
        CountingBody::new(Full::new(Bytes::from_static(b"abc")), m.caller_in.clone())
            .collect()
            .await
            .unwrap();
        assert_eq!(m.zuora_in.get(), 5);
        assert_eq!(m.caller_out.get(), 5);
        assert_eq!(m.caller_in.get(), 3);
        assert_eq!(m.zuora_out.get(), 0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"gateway_body_bytes_total{side="caller",direction="in"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"gateway_body_bytes_total{side="zuora",direction="in"} 5"#),
            "{text}"
        );
    }
}
