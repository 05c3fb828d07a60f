//! Link settings for the `zuora-gateway` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Packed relative relocations (DT_RELR; binutils ≥ 2.38, glibc ≥
        // 2.36, as in Debian 12 and the distroless cc-debian12 image): the
        // position-independent binary's ≈ 18,000 relative relocations take
        // 5 KB instead of 440 KB, which the loader no longer reads at
        // start-up. Measured: idle RSS −1.1 MiB (docs/performance.md).
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
