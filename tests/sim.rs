//! Black-box tests of the embedded Zuora simulator over real sockets on 127.0.0.1:0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, ALLOW, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    RETRY_AFTER, VARY,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use zuora_gateway::sim::{SimHandle, SimOptions, Simulator};

const CLIENT_ID: &str = "0b6c3f0e-5d7a-4c3e-9f61-2a8d4e1b7c90";
const CLIENT_SECRET: &str = "s3cr3t=with+special&chars";
const PROPAGATION: &str = "/v1/uno/data-backfill/propagation/jobs";
const README_JOB_ID: &str = "ff8080818bb300af018bb325fe0c58f3";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The reason code of a Zuora error body.
    fn code(&self) -> u64 {
        let body = self.json();
        assert_eq!(body["success"], false, "{body}");
        body["reasons"][0]["code"].as_u64().expect("integer code")
    }
}

struct Sim {
    handle: SimHandle,
    client: HttpClient,
}

impl Sim {
    async fn start(opts: SimOptions) -> Self {
        let handle = Simulator::start("127.0.0.1:0".parse().unwrap(), opts)
            .await
            .unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { handle, client }
    }

    async fn with_credentials() -> Self {
        Self::start(SimOptions {
            client_id: Some(CLIENT_ID.to_owned()),
            client_secret: Some(CLIENT_SECRET.to_owned()),
            ..SimOptions::default()
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.handle.base_url())
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn token_request(&self, form: &str) -> Answer {
        let request = Request::post(self.url("/oauth/token"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::from(form.to_owned()))
            .unwrap();
        self.send(request).await
    }

    async fn token(&self) -> String {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", CLIENT_ID)
            .append_pair("client_secret", CLIENT_SECRET)
            .append_pair("grant_type", "client_credentials")
            .finish();
        let answer = self.token_request(&form).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.json()["access_token"].as_str().unwrap().to_owned()
    }

    async fn api(&self, method: Method, path: &str, token: &str, body: &str) -> Answer {
        let request = Request::builder()
            .method(method)
            .uri(self.url(path))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_owned()))
            .unwrap();
        self.send(request).await
    }

    async fn stop_job(&self, token: &str, job_id: &str, body: &str) -> Answer {
        self.api(Method::PUT, &format!("{PROPAGATION}/{job_id}"), token, body)
            .await
    }
}

fn is_uuid(s: &str) -> bool {
    let lens: Vec<usize> = s.split('-').map(str::len).collect();
    lens == [8, 4, 4, 4, 12] && s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

// ---- OAuth -------------------------------------------------------------------------------------

#[tokio::test]
async fn token_is_issued_and_accepted_on_v1() {
    let sim = Sim::with_credentials().await;
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", CLIENT_ID)
        .append_pair("client_secret", CLIENT_SECRET)
        .append_pair("grant_type", "client_credentials")
        .finish();
    let answer = sim.token_request(&form).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert!(is_uuid(answer.header("zuora-request-id").unwrap()));
    let body = answer.json();
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 3599);
    assert!(body["scope"].as_str().unwrap().contains("tenant."));
    assert!(!body["jti"].as_str().unwrap().is_empty());

    let answer = sim.api(Method::GET, PROPAGATION, token, "").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["success"], true);
    assert_eq!(answer.header("ratelimit-limit"), Some("50000;w=60"));
    let remaining: u64 = answer
        .header("ratelimit-remaining")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 50_000);
    let reset: u64 = answer.header("ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset));
    assert_eq!(answer.header("concurrency-limit-type"), Some("Default"));
    assert_eq!(answer.header("concurrency-limit-limit"), Some("40"));
    assert!(answer.header("concurrency-limit-remaining").is_some());

    let control = sim.handle.control();
    assert_eq!(control.token_requests(), 1);
    assert_eq!(control.tokens_issued(), 1);
    assert_eq!(control.api_requests(), 1);
    assert_eq!(control.unauthorized_requests(), 0);

    // The recorded token request carries the form as sent; the API request its bearer token.
    let log = control.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].method, Method::POST);
    assert_eq!(log[0].path_and_query, "/oauth/token");
    let fields: Vec<(String, String)> = form_urlencoded::parse(&log[0].body).into_owned().collect();
    assert!(fields.contains(&("grant_type".into(), "client_credentials".into())));
    assert!(fields.contains(&("client_secret".into(), CLIENT_SECRET.into())));
    assert_eq!(log[1].bearer_token.as_deref(), Some(token));
    assert_eq!(log[1].path_and_query, PROPAGATION);

    control.clear_requests();
    assert!(control.requests().is_empty());
}

#[tokio::test]
async fn bad_token_requests_are_rejected() {
    let sim = Sim::with_credentials().await;
    let cases = [
        (
            format!("client_id={CLIENT_ID}&client_secret=wrong&grant_type=client_credentials"),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            "client_id=someone-else&client_secret=x&grant_type=client_credentials".to_owned(),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            format!("client_id={CLIENT_ID}&client_secret=x&grant_type=password"),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            "client_secret=x&grant_type=client_credentials".to_owned(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            format!("client_id={CLIENT_ID}&client_secret=x"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (form, status, error) in &cases {
        let answer = sim.token_request(form).await;
        assert_eq!(answer.status, *status, "{form}");
        let body = answer.json();
        assert_eq!(body["error"], *error, "{form}");
        assert_eq!(body["success"], false);
        assert!(body["reasons"][0]["code"].is_u64());
    }
    // Not a form at all.
    let request = Request::post(sim.url("/oauth/token"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::from(r#"{"client_id":"x"}"#))
        .unwrap();
    assert_eq!(sim.send(request).await.status, StatusCode::BAD_REQUEST);
    // Not a POST.
    let request = Request::get(sim.url("/oauth/token"))
        .body(Full::default())
        .unwrap();
    let answer = sim.send(request).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.code() % 100, 45);

    let control = sim.handle.control();
    assert_eq!(control.tokens_issued(), 0);
    assert_eq!(control.token_requests(), cases.len() as u64 + 2);
}

#[tokio::test]
async fn any_credentials_are_accepted_when_none_are_configured() {
    let sim = Sim::start(SimOptions::default()).await;
    let answer = sim
        .token_request("client_id=a&client_secret=b&grant_type=client_credentials")
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = sim
        .token_request("client_id=a&client_secret=&grant_type=client_credentials")
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn expired_token_gets_401_and_is_counted() {
    let sim = Sim::with_credentials().await;
    let control = sim.handle.control();
    control.set_token_ttl(Duration::from_secs(1));
    let token = sim.token().await;
    assert_eq!(
        sim.api(Method::GET, PROPAGATION, &token, "").await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answer = sim.api(Method::GET, PROPAGATION, &token, "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.code(), 90_000_011);
    assert_eq!(
        answer.json()["reasons"][0]["message"],
        "Authentication error"
    );
    assert_eq!(control.expired_token_requests(), 1);
    assert_eq!(control.unauthorized_requests(), 1);
}

#[tokio::test]
async fn revoked_tokens_get_401_and_new_tokens_work() {
    let sim = Sim::with_credentials().await;
    let control = sim.handle.control();
    let old = sim.token().await;
    control.revoke_all_tokens();
    let answer = sim.api(Method::GET, PROPAGATION, &old, "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.code(), 90_000_011);
    assert_eq!(control.expired_token_requests(), 0);
    let new = sim.token().await;
    assert_ne!(new, old);
    assert_eq!(
        sim.api(Method::GET, PROPAGATION, &new, "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn missing_or_unknown_token_gets_401() {
    let sim = Sim::with_credentials().await;
    let request = Request::get(sim.url(PROPAGATION))
        .body(Full::default())
        .unwrap();
    let answer = sim.send(request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.code(), 90_000_011);
    let answer = sim.api(Method::GET, PROPAGATION, "deadbeef", "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    // 401s carry the /v1 headers too.
    assert!(answer.header("ratelimit-remaining").is_some());
    let control = sim.handle.control();
    assert_eq!(control.unauthorized_requests(), 2);
    assert_eq!(control.api_requests(), 2);
}

#[tokio::test]
async fn token_endpoint_faults() {
    let sim = Sim::with_credentials().await;
    let control = sim.handle.control();
    let form = format!("client_id={CLIENT_ID}&client_secret=x&grant_type=client_credentials");

    control.set_token_endpoint_down(true);
    let answer = sim.token_request(&form).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.code() % 100, 61);
    control.set_token_endpoint_down(false);

    control.set_token_rate_limited(Some(12));
    let answer = sim.token_request(&form).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.header("retry-after"), Some("12"));
    assert_eq!(answer.code() % 100, 70);
    control.set_token_rate_limited(None);

    control.set_token_latency(Duration::from_millis(200));
    let started = Instant::now();
    sim.token().await;
    assert!(started.elapsed() >= Duration::from_millis(200));

    assert_eq!(control.token_requests(), 3);
    assert_eq!(control.tokens_issued(), 1);
}

// ---- stopping jobs -----------------------------------------------------------------------------

#[tokio::test]
async fn stop_job_answers_documented_shape_and_job_becomes_stopping() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let answer = sim
        .stop_job(&token, README_JOB_ID, r#"{"status":"Stopping"}"#)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["processId", "reasons", "requestId", "success"]);
    let process_id = body["processId"].as_str().unwrap();
    assert_eq!(process_id.len(), 16);
    assert!(
        process_id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    );
    assert_eq!(body["reasons"], json!([]));
    assert_eq!(body["success"], true);
    assert_eq!(
        body["requestId"].as_str(),
        answer.header("zuora-request-id")
    );

    let job = sim.handle.control().job(README_JOB_ID).unwrap();
    assert_eq!(job.status, "Stopping");
    let answer = sim
        .api(
            Method::GET,
            &format!("{PROPAGATION}/{README_JOB_ID}"),
            &token,
            "",
        )
        .await;
    assert_eq!(answer.json()["job"]["status"], "Stopping");

    // Stopping again is fine.
    let again = sim
        .stop_job(&token, README_JOB_ID, r#"{"status":"Stopping"}"#)
        .await;
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_stop_requests_get_documented_categories() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let id31 = &README_JOB_ID[..31];
    let id33 = format!("{README_JOB_ID}0");
    let cases: [(&str, &str, u64); 7] = [
        (id31, r#"{"status":"Stopping"}"#, 20),
        (&id33, r#"{"status":"Stopping"}"#, 20),
        (README_JOB_ID, r#"{"status":"Stopping""#, 90),
        (README_JOB_ID, "", 90),
        (README_JOB_ID, "{}", 22),
        (README_JOB_ID, r#"{"status":"Stopped"}"#, 20),
        (README_JOB_ID, r#"{"status":"stopping"}"#, 20),
    ];
    for (job_id, body, category) in cases {
        let answer = sim.stop_job(&token, job_id, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{job_id} {body}");
        let code = answer.code();
        assert_eq!(code % 100, category, "{job_id} {body}: {code}");
        assert!(
            (10_000_000..100_000_000).contains(&code),
            "8 digits: {code}"
        );
        let json = answer.json();
        assert_eq!(json["processId"].as_str().unwrap().len(), 16);
        assert!(is_uuid(json["requestId"].as_str().unwrap()));
    }
    // None of them touched the job.
    assert_eq!(sim.handle.control().job(README_JOB_ID), None);
}

#[tokio::test]
async fn created_job_can_be_read_and_stopped_in_every_family() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let control = sim.handle.control();
    for family in [
        PROPAGATION,
        "/v1/uno/data-backfill/jobs",
        "/v1/uno/data-backfill/bookingdate/jobs",
    ] {
        let answer = sim
            .api(
                Method::POST,
                family,
                &token,
                r#"{"type":"OrderLineItem","batchSize":200,"dryRun":true}"#,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{family}");
        let body = answer.json();
        assert_eq!(body["success"], true);
        let job_id = body["jobId"].as_str().unwrap().to_owned();
        assert_eq!(job_id.len(), 32);

        let snapshot = control.job(&job_id).unwrap();
        assert_eq!(snapshot.job_type, "OrderLineItem");
        assert!(["Pending", "Processing"].contains(&snapshot.status.as_str()));

        let answer = sim
            .api(Method::GET, &format!("{family}/{job_id}"), &token, "")
            .await;
        let job = &answer.json()["job"];
        assert_eq!(job["id"], job_id.as_str());
        assert_eq!(job["type"], "OrderLineItem");
        for field in [
            "createdOn",
            "status",
            "batchSentCount",
            "batchFinishedCount",
            "errorCount",
            "progress",
        ] {
            assert!(!job[field].is_null(), "{field} missing in {job}");
        }

        let answer = sim
            .api(
                Method::PUT,
                &format!("{family}/{job_id}"),
                &token,
                r#"{"status":"Stopping"}"#,
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(control.job(&job_id).unwrap().status, "Stopping");
    }
}

#[tokio::test]
async fn create_job_validation_and_idempotency() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    for (body, category) in [
        (r#"{"batchSize":10}"#, 22),
        (r#"{"type":"Invoice"}"#, 20),
        (r#"{"type":"RatePlanCharge","batchSize":0}"#, 20),
        (r#"{"type":"RatePlanCharge","batchSize":1001}"#, 20),
        (r#"{"type":"RatePlanCharge","dryRun":"no"}"#, 20),
        ("not json", 90),
    ] {
        let answer = sim.api(Method::POST, PROPAGATION, &token, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.code() % 100, category, "{body}");
    }

    let create = |key: &'static str| {
        Request::post(sim.url(PROPAGATION))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header("idempotency-key", key)
            .body(Full::from(r#"{"type":"RatePlanCharge"}"#))
            .unwrap()
    };
    let first = sim.send(create("k-1")).await.json()["jobId"].clone();
    let again = sim.send(create("k-1")).await.json()["jobId"].clone();
    let other = sim.send(create("k-2")).await.json()["jobId"].clone();
    assert_eq!(first, again);
    assert_ne!(first, other);
}

#[tokio::test]
async fn unknown_job_paths_and_methods() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let answer = sim
        .api(
            Method::GET,
            &format!("{PROPAGATION}/{README_JOB_ID}"),
            &token,
            "",
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.code() % 100, 40);

    let answer = sim.api(Method::GET, "/v1/accounts/A0001", &token, "").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.code() % 100, 40);

    let answer = sim.api(Method::DELETE, PROPAGATION, &token, "").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.code() % 100, 45);
    assert_eq!(answer.header(ALLOW.as_str()), Some("GET, POST"));

    let answer = sim
        .api(
            Method::POST,
            &format!("{PROPAGATION}/{README_JOB_ID}"),
            &token,
            "{}",
        )
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.header(ALLOW.as_str()), Some("GET, PUT"));

    // Outside /v1 and /oauth/token: 404, not counted as an API request.
    let request = Request::get(sim.url("/nope"))
        .body(Full::default())
        .unwrap();
    assert_eq!(sim.send(request).await.status, StatusCode::NOT_FOUND);
    assert_eq!(sim.handle.control().api_requests(), 4);
}

// ---- compression -------------------------------------------------------------------------------

#[tokio::test]
async fn job_list_is_gzipped_only_when_asked() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;

    let plain = sim.api(Method::GET, PROPAGATION, &token, "").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(
        plain.body.len() > 1000,
        "list is {} bytes",
        plain.body.len()
    );
    assert_eq!(plain.header(CONTENT_ENCODING.as_str()), None);
    assert_eq!(
        plain.header(CONTENT_LENGTH.as_str()),
        Some(plain.body.len().to_string().as_str())
    );
    let jobs = plain.json()["jobs"].as_array().unwrap().len();
    assert!(jobs >= 40);

    let request = Request::get(sim.url(PROPAGATION))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(ACCEPT_ENCODING, "gzip, deflate")
        .body(Full::default())
        .unwrap();
    let packed = sim.send(request).await;
    assert_eq!(packed.header(CONTENT_ENCODING.as_str()), Some("gzip"));
    assert_eq!(packed.header(VARY.as_str()), Some("Accept-Encoding"));
    assert!(packed.body.len() < plain.body.len());
    let unpacked: Value = serde_json::from_slice(&gunzip(&packed.body)).unwrap();
    assert_eq!(unpacked["jobs"].as_array().unwrap().len(), jobs);

    // q=0 refuses gzip; small answers are never compressed.
    let request = Request::get(sim.url(PROPAGATION))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(ACCEPT_ENCODING, "gzip;q=0")
        .body(Full::default())
        .unwrap();
    assert_eq!(
        sim.send(request).await.header(CONTENT_ENCODING.as_str()),
        None
    );
    let request = Request::get(sim.url(&format!("{PROPAGATION}?pageSize=1")))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(ACCEPT_ENCODING, "gzip")
        .body(Full::default())
        .unwrap();
    let small = sim.send(request).await;
    assert_eq!(small.header(CONTENT_ENCODING.as_str()), None);
    assert_eq!(small.json()["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn gzip_request_body_is_decoded_and_recorded() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let control = sim.handle.control();
    control.clear_requests();

    let json = br#"{"status":"Stopping"}"#;
    let packed = gzip(json);
    let request = Request::put(sim.url(&format!("{PROPAGATION}/{README_JOB_ID}")))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_ENCODING, "gzip")
        .body(Full::from(packed.clone()))
        .unwrap();
    let answer = sim.send(request).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let log = control.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].body.as_ref(), packed.as_slice());
    assert_eq!(log[0].decoded_body.as_ref(), json);

    let corrupt = Request::put(sim.url(&format!("{PROPAGATION}/{README_JOB_ID}")))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_ENCODING, "gzip")
        .body(Full::from(packed[..packed.len() / 2].to_vec()))
        .unwrap();
    let answer = sim.send(corrupt).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.code() % 100, 90);

    let brotli = Request::put(sim.url(&format!("{PROPAGATION}/{README_JOB_ID}")))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_ENCODING, "br")
        .body(Full::from(&json[..]))
        .unwrap();
    assert_eq!(
        sim.send(brotli).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
}

// ---- fault injection ---------------------------------------------------------------------------

#[tokio::test]
async fn injected_429_carries_retry_after_then_normal_service_resumes() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let control = sim.handle.control();
    control.inject_status(429, 2, Some(7));
    for _ in 0..2 {
        let answer = sim.api(Method::GET, PROPAGATION, &token, "").await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.header(RETRY_AFTER.as_str()), Some("7"));
        assert_eq!(answer.code() % 100, 70);
    }
    assert_eq!(
        sim.api(Method::GET, PROPAGATION, &token, "").await.status,
        StatusCode::OK
    );

    control.inject_status(503, 1, None);
    let answer = sim.api(Method::GET, PROPAGATION, &token, "").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header(RETRY_AFTER.as_str()), None);
    assert_eq!(answer.code() % 100, 61);

    control.inject_status(500, 1, None);
    // A 401 does not spend the injection.
    let answer = sim.api(Method::GET, PROPAGATION, "bogus", "").await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = sim.api(Method::GET, PROPAGATION, &token, "").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.code() % 100, 60);
}

#[tokio::test]
async fn api_latency_and_track_id_echo() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    sim.handle.control().set_latency(Duration::from_millis(150));
    let request = Request::get(sim.url(PROPAGATION))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header("zuora-track-id", "batch-42/run-7")
        .body(Full::default())
        .unwrap();
    let started = Instant::now();
    let answer = sim.send(request).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("zuora-track-id"), Some("batch-42/run-7"));
}

#[tokio::test]
async fn fixed_answer_mode_is_cheap_and_records_nothing() {
    let sim = Sim::start(SimOptions {
        fixed_answer: true,
        ..SimOptions::default()
    })
    .await;
    let answer = sim
        .api(
            Method::POST,
            "/v1/anything/at/all",
            "any-token",
            r#"{"a":1}"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json(), json!({"success": true}));
    assert!(is_uuid(answer.header("zuora-request-id").unwrap()));
    assert!(answer.header("ratelimit-remaining").is_some());

    let request = Request::get(sim.url("/v1/x"))
        .body(Full::default())
        .unwrap();
    assert_eq!(sim.send(request).await.status, StatusCode::UNAUTHORIZED);

    let control = sim.handle.control();
    assert_eq!(control.api_requests(), 2);
    assert!(control.requests().is_empty());
}

// ---- transports and lifecycle ------------------------------------------------------------------

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let sim = Sim::with_credentials().await;
    let token = sim.token().await;
    let tcp = tokio::net::TcpStream::connect(sim.handle.addr())
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(sim.url(PROPAGATION))
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn serves_tls_with_a_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, ServerName};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();

    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], PrivateKeyDer::from(leaf_key))
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let handle = Simulator::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        SimOptions::default(),
        Arc::new(server),
    )
    .await
    .unwrap();
    let base = handle.base_url();
    assert!(base.starts_with("https://localhost:"), "{base}");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(handle.addr()).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);

    let request = Request::post(format!("{base}/oauth/token"))
        .header(http::header::HOST, "localhost")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::<Bytes>::from(
            "client_id=a&client_secret=b&grant_type=client_credentials",
        ))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let token: Value = serde_json::from_slice(&body).unwrap();
    let token = token["access_token"].as_str().unwrap();

    let request = Request::get(format!("{base}{PROPAGATION}"))
        .header(http::header::HOST, "localhost")
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(handle.control().api_requests(), 1);
    handle.shutdown().await;
}

#[tokio::test]
async fn shutdown_and_drop_close_the_port() {
    let sim = Sim::start(SimOptions::default()).await;
    let addr = sim.handle.addr();
    // An idle keep-alive connection must not hold shutdown up.
    let _ = sim.token().await;
    let started = Instant::now();
    sim.handle.shutdown().await;
    assert!(started.elapsed() < Duration::from_millis(900));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let handle = Simulator::start("127.0.0.1:0".parse().unwrap(), SimOptions::default())
        .await
        .unwrap();
    let addr = handle.addr();
    drop(handle);
    let deadline = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "port still open after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
