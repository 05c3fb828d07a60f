//! Zuora's official SDKs start with `POST /oauth/token` against their base
//! URL; pointed at the gateway, that request is answered locally and Zuora's
//! credentials never leave the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use support::*;

const FORM: &str = "application/x-www-form-urlencoded";

fn jwt_yaml(sim: &zuora_gateway::sim::SimHandle) -> String {
    format!(
        "{SERVER_YAML}{}callers:\n  jwt:\n    audience: zuora-gateway\n    keys:\n      - {{ kid: k1, alg: HS256, secret: {HS_KEY} }}\nroutes:\n  - name: read\n    method: GET\n    path: /v1/uno/data-backfill/propagation/jobs/**\n    upstream: zuora\n    allow_callers: [\"billing-*\"]\n",
        upstream_yaml(sim)
    )
}

fn mint(sub: &str, ttl: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims =
        serde_json::json!({ "sub": sub, "aud": "zuora-gateway", "iat": now, "exp": now + ttl });
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HS_KEY.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn sdk_token_request_with_a_caller_jwt_gets_it_back_as_the_access_token() {
    let sim = simulator().await;
    let g = gateway(&jwt_yaml(&sim)).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let zuora_token_requests = sim.control().token_requests();
    let jwt = mint("billing-sdk", 600);

    let form = format!("client_id=billing-sdk&client_secret={jwt}&grant_type=client_credentials");
    let r = send(request(
        Method::POST,
        &g.url("/oauth/token"),
        &[("content-type", FORM)],
        form,
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["access_token"], jwt.as_str());
    assert_eq!(v["token_type"], "bearer");
    let expires_in = v["expires_in"].as_u64().unwrap();
    assert!((590..=600).contains(&expires_in), "{expires_in}");
    assert_eq!(r.headers["cache-control"], "no-store");

    // The SDK then calls the API with that token.
    let bearer = format!("Bearer {}", v["access_token"].as_str().unwrap());
    let r = send(request(
        Method::GET,
        &g.url("/v1/uno/data-backfill/propagation/jobs"),
        &[("authorization", &bearer)],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        sim.control().token_requests(),
        zuora_token_requests,
        "never forwarded to Zuora"
    );
    g.shutdown().await;
}

#[tokio::test]
async fn sdk_token_request_with_bad_credentials_is_refused_locally() {
    let sim = simulator().await;
    let g = gateway(&jwt_yaml(&sim)).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let before = sim.control().token_requests();
    let cases = [
        (
            "client_id=x&client_secret=not-a-jwt&grant_type=client_credentials",
            StatusCode::UNAUTHORIZED,
            "11",
        ),
        (
            "client_id=x&grant_type=client_credentials",
            StatusCode::UNAUTHORIZED,
            "11",
        ),
        (
            &*format!(
                "client_id=x&client_secret={}&grant_type=password",
                mint("billing-sdk", 60)
            ),
            StatusCode::BAD_REQUEST,
            "20",
        ),
        ("client_id=x&client_secret=y", StatusCode::BAD_REQUEST, "22"),
    ];
    for (form, status, category) in cases {
        let r = send(request(
            Method::POST,
            &g.url("/oauth/token"),
            &[("content-type", FORM)],
            form.to_owned(),
        ))
        .await
        .unwrap();
        assert_eq!(r.status, status, "{form}: {}", r.text());
        assert!(r.code().ends_with(category), "{form}: {}", r.text());
        assert!(
            !r.text().contains("not-a-jwt"),
            "credentials are not echoed"
        );
    }
    let r = send(request(Method::GET, &g.url("/oauth/token"), &[], ""))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(sim.control().token_requests(), before);
    g.shutdown().await;
}

#[tokio::test]
async fn sidecar_mode_hands_sdks_a_placeholder_token() {
    let sim = simulator().await;
    let yaml = format!(
        "{SERVER_YAML}{}callers:\n  trusted_identity: billing-sidecar\nroutes:\n  - name: read\n    method: GET\n    path: /v1/uno/data-backfill/propagation/jobs/**\n    upstream: zuora\n    allow_callers: [\"billing-*\"]\n",
        upstream_yaml(&sim)
    );
    let g = gateway(&yaml).await;
    wait_ready(&g, Duration::from_secs(5)).await;
    let r = send(request(
        Method::POST,
        &g.url("/oauth/token"),
        &[("content-type", FORM)],
        "client_id=anything&client_secret=anything&grant_type=client_credentials",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let token = r.json()["access_token"].as_str().unwrap().to_owned();
    assert!(!token.contains(CLIENT_SECRET));
    let r = send(request(
        Method::GET,
        &g.url("/v1/uno/data-backfill/propagation/jobs"),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    ))
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    g.shutdown().await;
}
