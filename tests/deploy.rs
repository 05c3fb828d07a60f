//! Deployment files stay correct by construction: every YAML under deploy/
//! parses, and every gateway policy embedded in them passes `check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

/// Runs `zuora-gateway check` on `policy`, with the secrets it references
/// provided in a temp dir (absolute `/var/run/secrets/` paths are mapped there).
fn check(policy: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("zuora")).unwrap();
    std::fs::write(
        secrets.join("zuora/client_id"),
        "0123456789abcdef0123456789abcdef0123\n",
    )
    .unwrap();
    std::fs::write(secrets.join("zuora/client_secret"), "placeholder-secret\n").unwrap();
    let policy = policy.replace("/var/run/secrets/", &format!("{}/", secrets.display()));
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, policy).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zuora-gateway"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_deploy_yaml_parses_and_every_embedded_policy_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    assert!(files.len() >= 4, "{files:?}");
    let mut policies = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!docs.is_empty(), "{}", file.display());
        for doc in &docs {
            // ConfigMaps carrying a gateway policy.
            if doc["kind"] == "ConfigMap" {
                for (key, value) in doc["data"].as_object().into_iter().flatten() {
                    if key.ends_with(".yaml") {
                        check(
                            value.as_str().unwrap(),
                            &format!("{}:{key}", file.display()),
                        );
                        policies += 1;
                    }
                }
            }
            // Stand-alone gateway configs.
            if doc.get("upstreams").is_some() && doc.get("server").is_some() {
                check(&text, &file.display().to_string());
                policies += 1;
            }
        }
    }
    assert!(policies >= 3, "found {policies} policies");
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .unwrap();
    assert!(text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2);
    assert!(text.contains("USER nonroot"));
    assert!(text.contains("HEALTHCHECK"));
    assert!(text.contains("healthcheck"), "uses the binary's own probe");
    // The probe subcommand exists and fails cleanly when nothing listens.
    let out = Command::new(env!("CARGO_BIN_EXE_zuora-gateway"))
        .args(["healthcheck", "--url", "http://127.0.0.1:9/healthz"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn dockerfile_copies_everything_the_release_build_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let copied: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len().saturating_sub(1)].to_vec()
        })
        .collect();
    // The build script (link flags), the workspace's path crates, the
    // sources and the bench targets that Cargo.toml declares.
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "build.rs", "src", "benches"];
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for line in manifest.lines() {
        if let Some(rest) = line.split("path = \"").nth(1) {
            let path = rest.split('"').next().unwrap();
            let top = path.split('/').next().unwrap();
            if !needed.contains(&top) && !path.starts_with("src/") {
                needed.push(top);
            }
        }
    }
    assert!(
        needed.contains(&"crates"),
        "the allocator crate: {needed:?}"
    );
    for path in needed {
        assert!(root.join(path).exists(), "{path} is not in the repository");
        assert!(
            copied.contains(&path),
            "deploy/Dockerfile does not COPY {path} (copies {copied:?})"
        );
    }
}
