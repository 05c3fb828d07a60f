use std::collections::HashMap;
use std::path::Path;

use super::*;

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| map.get(k).cloned()
}

fn load(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    Config::from_yaml(yaml, Path::new("test.yaml"), &dir, &env(vars))
}

const SECRETS: &[(&str, &str)] = &[
    ("ZUORA_CLIENT_ID", "0123456789abcdef0123456789abcdef0123"),
    ("ZUORA_CLIENT_SECRET", "s3cr3t-value"),
    (
        "GATEWAY_HS256_SECRET",
        "0123456789abcdef0123456789abcdef-hs256",
    ),
];

#[test]
fn the_issue_document_is_accepted_as_written() {
    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.yaml"))
            .unwrap();
    let c = load(&yaml, SECRETS).unwrap();
    assert_eq!(c.server.listen.port(), 8080);
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].validation, Validation::StopJob);
    assert_eq!(c.routes[1].validation, Validation::None);
    let l = &c.rate_limits["stop-per-job"];
    assert_eq!(l.key, vec![LimitKey::Param("jobId".into())]);
    assert_eq!(l.per, std::time::Duration::from_secs(60));
    assert_eq!(
        c.upstreams["zuora"].oauth.client_secret.expose(),
        "s3cr3t-value"
    );
    assert_eq!(
        c.upstreams["zuora"].request_timeout,
        std::time::Duration::from_secs(125)
    );
}

#[test]
fn unset_environment_variable_is_named() {
    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.yaml"))
            .unwrap();
    let e = load(&yaml, &SECRETS[..1]).unwrap_err();
    assert_eq!(e.path, "upstreams.zuora.oauth.client_secret");
    assert!(e.message.contains("ZUORA_CLIENT_SECRET"), "{e}");
}

const MIN: &str = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\n";

#[test]
fn minimal_sidecar_config_is_valid() {
    let c = load(MIN, &[]).unwrap();
    assert!(matches!(c.callers, CallerAuthConfig::TrustedIdentity(ref s) if s == "svc"));
    assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
    let zuora = &c.upstreams["zuora"];
    assert_eq!(zuora.pool_max_idle_per_host, 32);
    assert_eq!(zuora.pool_idle_timeout, std::time::Duration::from_secs(30));
}

#[test]
fn successes_are_sampled_one_in_ten_by_default() {
    let c = load(MIN, &[]).unwrap();
    assert_eq!(c.telemetry.sampling_ratio, 0.1);
    let c = load(&format!("{MIN}telemetry: {{ sampling_ratio: 1 }}\n"), &[]).unwrap();
    assert_eq!(c.telemetry.sampling_ratio, 1.0);
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let e = load(
        &format!("{MIN}routes:\n  - {{ name: r, path: /v1/x, upstream: zuora, colour: red }}\n"),
        &[],
    )
    .unwrap_err();
    assert!(e.path.starts_with("routes[0]"), "{e}");
    assert!(e.message.contains("colour"), "{e}");
}

#[test]
fn cross_references_are_checked() {
    let e = load(
        &format!("{MIN}routes:\n  - {{ name: r, path: /v1/x, upstream: nope }}\n"),
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "routes[0].upstream");
    let e = load(
        &format!("{MIN}routes:\n  - {{ name: r, path: '/v1/x/{{id}}', upstream: zuora, rate_limits: [a, b] }}\nrate_limits:\n  a: {{ key: caller, rate: 1/second }}\n"),
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "routes[0].rate_limits[1]");
    let e = load(
        &format!("{MIN}routes:\n  - {{ name: r, path: '/v1/x/{{id}}', upstream: zuora, rate_limits: [a] }}\nrate_limits:\n  a: {{ key: jobId, rate: 1/second }}\n"),
        &[],
    )
    .unwrap_err();
    assert_eq!(e.path, "routes[0].rate_limits[0]");
    assert!(e.message.contains("jobId"));
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (
            "server: { listen: nowhere }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\n",
            "server.listen",
        ),
        (
            &format!("{MIN}rate_limits:\n  a: {{ key: caller, rate: 0/second }}\n"),
            "rate_limits.a.rate",
        ),
        (
            &format!("{MIN}rate_limits:\n  a: {{ key: caller, rate: 1/second, store: redis }}\n"),
            "rate_limits.a.store",
        ),
        (
            &format!("{MIN}routes:\n  - {{ name: r, path: /v1/../x, upstream: zuora }}\n"),
            "routes[0].path",
        ),
        (
            &format!("{MIN}routes:\n  - {{ name: r, path: /v1/**/x, upstream: zuora }}\n"),
            "routes[0].path",
        ),
        (
            "server: { listen: 0.0.0.0:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers: { trusted_identity: svc }\n",
            "callers.trusted_identity",
        ),
        (
            "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: 'https://rest.zuora.com' } }\ncallers: { trusted_identity: svc }\n",
            "upstreams.zuora.oauth.client_id",
        ),
        (
            "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator, timeouts: { connect: 5 parsecs } } }\ncallers: { trusted_identity: svc }\n",
            "upstreams.zuora.timeouts.connect",
        ),
    ];
    for (yaml, path) in cases {
        let e = load(yaml, &[]).unwrap_err();
        assert_eq!(e.path, path, "{e}");
    }
}

#[test]
fn key_algorithm_must_match_material() {
    let yaml = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers:\n  jwt:\n    keys:\n      - { kid: a, alg: RS256, secret: '0123456789abcdef0123456789abcdef' }\n";
    let e = load(yaml, &[]).unwrap_err();
    assert_eq!(e.path, "callers.jwt.keys[0].secret");
    let yaml = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: simulator } }\ncallers:\n  jwt:\n    keys:\n      - { kid: a, alg: HS256, public_key_file: keys/rs1.pub.pem }\n";
    let e = load(yaml, &[]).unwrap_err();
    assert_eq!(e.path, "callers.jwt.keys[0].public_key_file");
}

#[test]
fn secrets_never_appear_in_errors_or_debug() {
    let yaml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.yaml"))
            .unwrap();
    let c = load(&yaml, SECRETS).unwrap();
    let dump = format!("{c:?}");
    assert!(!dump.contains("s3cr3t-value"));
    assert!(!dump.contains("abcdef-hs256"));
}

#[test]
fn file_references_are_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("id"), "from-a-file\n").unwrap();
    let yaml = "server: { listen: 127.0.0.1:8080 }\nupstreams: { zuora: { base_url: 'https://rest.zuora.com', oauth: { client_id: '${file:id}', client_secret: '${file:id}' } } }\ncallers: { trusted_identity: svc }\n";
    let c = Config::from_yaml(yaml, Path::new("t.yaml"), dir.path(), &env(&[])).unwrap();
    assert_eq!(c.upstreams["zuora"].oauth.client_id.expose(), "from-a-file");
}

#[test]
fn durations_parse() {
    use std::time::Duration;
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("x"), None);
}

#[test]
fn worker_threads_defaults_to_the_runtime_and_is_bounded() {
    assert_eq!(load(MIN, &[]).unwrap().server.worker_threads, None);
    let with = |n: &str| {
        load(
            &MIN.replace(
                "{ listen: 127.0.0.1:8080 }",
                &format!("{{ listen: 127.0.0.1:8080, worker_threads: {n} }}"),
            ),
            &[],
        )
    };
    assert_eq!(with("1").unwrap().server.worker_threads, Some(1));
    assert_eq!(with("4").unwrap().server.worker_threads, Some(4));
    for bad in ["0", "257", "two"] {
        let e = with(bad).unwrap_err();
        assert_eq!(e.path, "server.worker_threads", "{bad}: {e}");
    }
}

#[test]
fn work_stealing_is_off_by_default_and_must_be_a_bool() {
    assert!(!load(MIN, &[]).unwrap().server.work_stealing);
    let with = |v: &str| {
        load(
            &MIN.replace(
                "{ listen: 127.0.0.1:8080 }",
                &format!("{{ listen: 127.0.0.1:8080, work_stealing: {v} }}"),
            ),
            &[],
        )
    };
    assert!(with("true").unwrap().server.work_stealing);
    let e = with("sometimes").unwrap_err();
    assert_eq!(e.path, "server.work_stealing", "{e}");
}
