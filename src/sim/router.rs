//! Request dispatch: `/oauth/token`, `/v1/**` (full or bench mode) and everything else.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::body::{self, BodyError, MAX_BODY};
use super::control::{Injection, RecordedRequest, SimControl};
use super::gzip::{self, DecodeError};
use super::jobs::{self, ApiRequest};
use super::oauth::{self, TokenCheck};
use super::response::{AUTHENTICATION_ERROR, Category, Ctx, Reply, Resource, finalize};

/// The bench-mode answer to every authenticated `/v1` request.
const FIXED_ANSWER: &str = r#"{"success":true}"#;

/// Answers one request. Never fails: every problem becomes a Zuora-shaped response.
pub(crate) async fn handle(
    control: Arc<SimControl>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/v1" || path.starts_with("/v1/") {
        control.count_api_request();
        let _in_flight = control.enter();
        if control.fixed_answer() {
            fixed_answer(&control, request).await
        } else {
            api(&control, request).await
        }
    } else if path == "/oauth/token" {
        token(&control, request).await
    } else {
        let ctx = Ctx::new(request.headers());
        finalize(not_found(&ctx), &ctx, None)
    }
}

/// `/oauth/token`: read, decode and record the body, then let [`oauth`] answer.
async fn token(control: &SimControl, request: Request<Incoming>) -> Response<Full<Bytes>> {
    control.count_token_request();
    let ctx = Ctx::new(request.headers());
    let (parts, body) = request.into_parts();
    let raw = match body::read(body).await {
        Ok(raw) => raw,
        Err(err) => return finalize(body_error(err, Resource::AUTH, &ctx), &ctx, None),
    };
    let decoded = gzip::decode_request_body(&parts.headers, &raw, MAX_BODY);
    control.record(recorded(&parts, &raw, decoded.as_ref().ok()));
    let reply = if parts.method != Method::POST {
        Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            Resource::AUTH.code(Category::UnsupportedMethod),
            "Use POST to request a token.",
            &ctx,
        )
        .with_header(ALLOW, HeaderValue::from_static("POST"))
    } else {
        match decoded {
            Ok(form) => oauth::token_endpoint(control, &parts.headers, &form, &ctx).await,
            Err(err) => decode_error(err, Resource::AUTH, &ctx),
        }
    };
    finalize(reply, &ctx, None)
}

/// `/v1/**`: body, record, latency, token check, injected status, then the routes.
async fn api(control: &SimControl, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let ctx = Ctx::new(request.headers());
    let (parts, body) = request.into_parts();
    let raw = match body::read(body).await {
        Ok(raw) => raw,
        Err(err) => {
            return finalize(
                body_error(err, Resource::GENERIC, &ctx),
                &ctx,
                Some(control),
            );
        }
    };
    let decoded = gzip::decode_request_body(&parts.headers, &raw, MAX_BODY);
    control.record(recorded(&parts, &raw, decoded.as_ref().ok()));

    sleep(control.latency()).await;
    let check = match oauth::bearer_token(&parts.headers) {
        Some(token) => control.tokens.check(token),
        None => TokenCheck::Unknown,
    };
    if check != TokenCheck::Valid {
        if check == TokenCheck::Expired {
            control.count_expired_token();
        }
        return finalize(unauthorized(control, &ctx), &ctx, Some(control));
    }
    if let Some(injection) = control.take_injection() {
        return finalize(injected(injection, &ctx), &ctx, Some(control));
    }

    let reply = match decoded {
        Ok(body) => {
            let api_request = ApiRequest {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
                body: &body,
            };
            jobs::route(&control.jobs, &api_request, &ctx).unwrap_or_else(|| not_found(&ctx))
        }
        Err(err) => decode_error(err, Resource::GENERIC, &ctx),
    };
    finalize(reply, &ctx, Some(control))
}

/// Bench mode: any bearer token will do, nothing is stored or recorded.
async fn fixed_answer(control: &SimControl, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let ctx = Ctx::new(request.headers());
    let authorized = oauth::bearer_token(request.headers()).is_some();
    // Read the body off the wire so the HTTP/1.1 connection can be reused.
    body::drain(request.into_body()).await;
    sleep(control.latency()).await;
    let reply = if !authorized {
        unauthorized(control, &ctx)
    } else if let Some(injection) = control.take_injection() {
        injected(injection, &ctx)
    } else {
        Reply::static_json(StatusCode::OK, FIXED_ANSWER)
    };
    finalize(reply, &ctx, Some(control))
}

async fn sleep(latency: std::time::Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

fn recorded(parts: &Parts, raw: &Bytes, decoded: Option<&Bytes>) -> RecordedRequest {
    RecordedRequest {
        method: parts.method.clone(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts.headers.clone(),
        body: raw.clone(),
        decoded_body: decoded.unwrap_or(raw).clone(),
        bearer_token: oauth::bearer_token(&parts.headers).map(str::to_owned),
    }
}

fn unauthorized(control: &SimControl, ctx: &Ctx) -> Reply {
    control.count_unauthorized();
    Reply::error(
        StatusCode::UNAUTHORIZED,
        AUTHENTICATION_ERROR,
        "Authentication error",
        ctx,
    )
}

fn injected(injection: Injection, ctx: &Ctx) -> Reply {
    let category = Category::for_status(injection.status);
    let message = match category {
        Category::LimitExceeded => "The request exceeded a limit. Retry after the indicated time.",
        Category::TemporaryError => "A temporary error occurred. Please retry.",
        Category::InternalError => "An internal error occurred.",
        _ => "Injected error.",
    };
    let reply = Reply::error(
        injection.status,
        Resource::GENERIC.code(category),
        message,
        ctx,
    );
    match injection.retry_after {
        Some(secs) => reply.with_header(RETRY_AFTER, HeaderValue::from(secs)),
        None => reply,
    }
}

fn not_found(ctx: &Ctx) -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        Resource::GENERIC.code(Category::NotFound),
        "The requested resource does not exist.",
        ctx,
    )
}

fn body_error(err: BodyError, resource: Resource, ctx: &Ctx) -> Reply {
    match err {
        BodyError::TooLarge => too_large(resource, ctx),
        BodyError::Broken => Reply::error(
            StatusCode::BAD_REQUEST,
            resource.code(Category::InvalidValue),
            "The request body could not be read.",
            ctx,
        ),
    }
}

fn decode_error(err: DecodeError, resource: Resource, ctx: &Ctx) -> Reply {
    match err {
        DecodeError::Unsupported => Reply::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            resource.code(Category::InvalidValue),
            "Unsupported Content-Encoding: only gzip is supported.",
            ctx,
        ),
        DecodeError::Corrupt => Reply::error(
            StatusCode::BAD_REQUEST,
            resource.code(Category::MalformedJson),
            "The gzip-compressed request body could not be decompressed.",
            ctx,
        ),
        DecodeError::TooLarge => too_large(resource, ctx),
    }
}

fn too_large(resource: Resource, ctx: &Ctx) -> Reply {
    Reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        resource.code(Category::LimitExceeded),
        "The request body is larger than 20 MiB.",
        ctx,
    )
}
