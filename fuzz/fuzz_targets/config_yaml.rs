//! The configuration loader: any text is either a validated Config or a
//! ConfigError, never a panic. No environment and no files are read (the
//! base directory does not exist, the environment is empty).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zuora_gateway::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let env = |_: &str| -> Option<String> { None };
    let _ = Config::from_yaml(
        yaml,
        Path::new("fuzz.yaml"),
        Path::new("/nonexistent/zuora-gateway-fuzz"),
        &env,
    );
});
