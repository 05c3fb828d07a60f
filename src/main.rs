//! zuora-gateway binary: parse args → load + validate config → telemetry →
//! serve → drain.

use std::process::ExitCode;

use clap::Parser;
use zuora_gateway::cli::{self, Cli, Command};

/// mimalloc instead of glibc's malloc: thread-local free lists make the many
/// small per-request allocations (headers, extensions, futures) cheaper, and
/// freed memory goes back to the OS instead of staying in glibc's arenas.
/// (Off with `--no-default-features`, for heap profilers.)
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: zuora_gateway_alloc::MiMalloc = zuora_gateway_alloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => cli::check(&config),
        Command::DevToken {
            config,
            caller,
            ttl,
            claims,
        } => cli::dev_token(&config, &caller, &ttl, &claims),
        Command::Serve { config } => {
            let config = match cli::load_or_report(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            zuora_gateway::run::serve(config)
        }
        Command::Explain {
            config,
            caller,
            claims,
            method,
            path,
        } => cli::explain(&config, &caller, &claims, &method, &path),
        Command::Simulate {
            listen,
            fixed_answer,
            token_ttl,
        } => zuora_gateway::run::simulate(listen, fixed_answer, token_ttl),
        Command::Healthcheck { url } => zuora_gateway::run::healthcheck(url),
    }
}
