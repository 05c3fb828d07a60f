//! gzip throughput on a 1 MB JSON body, through the real compression layer,
//! against plain copying of the same body as the baseline, in one run:
//!
//! - `copy`: the 1 MB body through a service with no compression layer;
//! - `pass_through`: Zuora's gzip body to a gzip-accepting caller;
//! - `decode_for_caller`: Zuora's gzip body decoded for a plain caller;
//! - `compress_request`: a plain 1 MB request body compressed towards Zuora
//!   (at the gateway's level, and at flate2's default level for comparison).
//!
//! Throughput is given in decoded JSON bytes for every case, so the numbers
//! compare directly. Bodies arrive in 16 KiB frames, as from a socket, and
//! whatever leaves is copied out, as a socket write would.
//!
//! Run: `cargo bench --bench gzip`; with `GZIP_BENCH_LEVELS=1` it also prints
//! size and time of the test body at every gzip level.

#![allow(clippy::expect_used)]

use std::io::Write;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tower::{Layer, ServiceExt};
use zuora_gateway::body::{self, Body};
use zuora_gateway::compression::{BodyMetrics, GzipBody};
use zuora_gateway::error::GatewayError;
use zuora_gateway::layers::compression::CompressionLayer;

const FRAME: usize = 16 * 1024;

/// About 1 MB of a Zuora-like job list.
fn json_1mb() -> Bytes {
    let mut out = String::from(r#"{"success":true,"jobs":["#);
    let mut i = 0u64;
    while out.len() < 1_000_000 {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"id":"ff8080818bb300af018bb3{i:010x}","createdOn":"2026-02-{:02}T10:{:02}:{:02}Z","status":"{}","type":"{}","batchSentCount":{},"batchFinishedCount":{},"errorCount":{},"progress":{}}}"#,
            1 + i % 28,
            i % 60,
            (i * 7) % 60,
            ["Completed", "Processing", "Stopping", "Stopped", "Failed"][(i % 5) as usize],
            ["RatePlanCharge", "OrderLineItem"][(i % 2) as usize],
            i % 1000,
            (i * 3) % 1000,
            i % 7,
            (i * 13) % 101,
        ));
        i += 1;
    }
    out.push_str("]}");
    Bytes::from(out)
}

fn gzip(data: &[u8], level: flate2::Compression) -> Bytes {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
    e.write_all(data).expect("in-memory write");
    Bytes::from(e.finish().expect("in-memory finish"))
}

fn frames(data: &Bytes) -> Vec<Bytes> {
    (0..data.len())
        .step_by(FRAME)
        .map(|at| data.slice(at..(at + FRAME).min(data.len())))
        .collect()
}

/// A body of unknown length yielding `frames`.
fn streamed(frames: &[Bytes]) -> Body {
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = frames
        .iter()
        .cloned()
        .map(|f| Ok(http_body::Frame::data(f)))
        .collect();
    body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// Reads a body to the end, copying it out as a socket write would.
async fn drain(mut body: Body) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 1024);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            out.extend_from_slice(&data);
        }
    }
    out
}

/// A Zuora stand-in that answers with `frames` (gzip-labelled if `gzip`) and
/// reads the request body to the end.
fn zuora(
    frames: Vec<Bytes>,
    gzip: bool,
) -> impl tower::Service<Request<Body>, Response = Response<Body>, Error = GatewayError, Future: Send>
+ Clone {
    tower::service_fn(move |req: Request<Body>| {
        let frames = frames.clone();
        async move {
            drain(req.into_body()).await;
            let mut resp = Response::new(streamed(&frames));
            if gzip {
                resp.headers_mut()
                    .insert(CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
            }
            Ok::<_, GatewayError>(resp)
        }
    })
}

fn get(accept: Option<&'static str>) -> Request<Body> {
    let mut req = Request::get("/v1/uno/data-backfill/propagation/jobs")
        .body(body::empty())
        .expect("request");
    if let Some(a) = accept {
        req.headers_mut()
            .insert(ACCEPT_ENCODING, http::HeaderValue::from_static(a));
    }
    req
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let json = json_1mb();
    let fast = gzip(&json, zuora_gateway::compression::LEVEL);
    let default = gzip(&json, flate2::Compression::default());
    eprintln!(
        "1 MB JSON: {} bytes; gzip at the gateway's level {} bytes ({:.1}%), at level 6 {} bytes ({:.1}%)",
        json.len(),
        fast.len(),
        100.0 * fast.len() as f64 / json.len() as f64,
        default.len(),
        100.0 * default.len() as f64 / json.len() as f64
    );
    if std::env::var_os("GZIP_BENCH_LEVELS").is_some() {
        for level in 1..=9 {
            let started = std::time::Instant::now();
            let mut size = 0;
            for _ in 0..20 {
                size = gzip(&json, flate2::Compression::new(level)).len();
            }
            eprintln!(
                "level {level}: {size} bytes ({:.1}%), {:.2} ms/MB",
                100.0 * size as f64 / json.len() as f64,
                started.elapsed().as_secs_f64() * 1000.0 / 20.0
            );
        }
    }
    let plain_frames = frames(&json);
    let gzip_frames = frames(&fast);
    let layer = CompressionLayer::new(BodyMetrics::default());

    let mut group = c.benchmark_group("gzip_1mb_json");
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.sample_size(30);

    let plain_zuora = zuora(plain_frames.clone(), false);
    group.bench_function("copy", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = plain_zuora
                    .clone()
                    .oneshot(get(None))
                    .await
                    .expect("response");
                drain(resp.into_body()).await.len()
            })
        })
    });

    let gzip_zuora = layer.layer(zuora(gzip_frames.clone(), true));
    group.bench_function("pass_through", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = gzip_zuora
                    .clone()
                    .oneshot(get(Some("gzip")))
                    .await
                    .expect("response");
                drain(resp.into_body()).await.len()
            })
        })
    });
    group.bench_function("decode_for_caller", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = gzip_zuora
                    .clone()
                    .oneshot(get(None))
                    .await
                    .expect("response");
                drain(resp.into_body()).await.len()
            })
        })
    });

    let sink = layer.layer(zuora(Vec::new(), false));
    group.bench_function("compress_request", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = Request::post("/v1/uno/data-backfill/propagation/jobs")
                    .body(streamed(&plain_frames))
                    .expect("request");
                sink.clone().oneshot(req).await.expect("response");
            })
        })
    });
    group.bench_function("compress_request_level6", |b| {
        b.iter(|| {
            rt.block_on(async {
                let body =
                    GzipBody::with_level(streamed(&plain_frames), flate2::Compression::default());
                drain(body::boxed(body)).await.len()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
