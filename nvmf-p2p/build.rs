//! With the `spdk` feature: SPDK's link line for this package's binaries and tests.
//! spdk-sys computes it (no --as-needed for SPDK's and DPDK's libraries, an rpath to
//! them) and passes it as `DEP_SPDK_LINK_ARGS` (tab-separated), since cargo keeps link
//! args to the package that emits them.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_some() {
        println!("cargo:rerun-if-env-changed=DEP_SPDK_LINK_ARGS");
        let args = std::env::var("DEP_SPDK_LINK_ARGS")
            .expect("spdk-sys (feature spdk) sets DEP_SPDK_LINK_ARGS");
        for a in args.split('\t').filter(|a| !a.is_empty()) {
            println!("cargo:rustc-link-arg={a}");
        }
    }
}
