//! Generates the libibverbs/librdmacm bindings and compiles the inline-verb shims.
//!
//! The bindgen invocation below is equivalent to:
//!
//! ```text
//! bindgen shim/shim.h \
//!   --allowlist-function 'ibv_.*|rdma_.*' --allowlist-type 'ibv_.*|rdma_.*' \
//!   --allowlist-var 'IBV_.*|RDMA_.*' --blocklist-function ibv_query_port \
//!   --default-enum-style moduleconsts --with-derive-default \
//!   -- [-I$RDMA_CORE_INCLUDE_DIR]
//! ```
//!
//! `shim/shim.h` includes `<infiniband/verbs.h>` and `<rdma/rdma_cma.h>` and declares
//! `rdma_sys_*` out-of-line versions of the `static inline` verbs (post_send, post_recv,
//! post_srq_recv, poll_cq, req_notify_cq, query_port), which `shim/shim.c` defines and
//! `cc` compiles. Set `RDMA_CORE_INCLUDE_DIR` to use rdma-core headers from a
//! non-system location (the same directory is passed to both clang and cc).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-env-changed=RDMA_CORE_INCLUDE_DIR");

    let include_dir = env::var_os("RDMA_CORE_INCLUDE_DIR").map(PathBuf::from);

    let mut build = cc::Build::new();
    build.file("shim/shim.c").warnings(true);
    if let Some(dir) = &include_dir {
        build.include(dir);
    }
    build.compile("rdma_sys_shim");

    println!("cargo:rustc-link-lib=ibverbs");
    println!("cargo:rustc-link-lib=rdmacm");

    let mut builder = bindgen::Builder::default()
        .header("shim/shim.h")
        .allowlist_function("ibv_.*")
        .allowlist_function("rdma_.*")
        // The exported `ibv_query_port` takes the old `_compat_ibv_port_attr`; the header
        // routes callers to an inline instead, which the shim wraps.
        .blocklist_function("ibv_query_port")
        .allowlist_type("ibv_.*")
        .allowlist_type("rdma_.*")
        .allowlist_var("IBV_.*")
        .allowlist_var("RDMA_.*")
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .derive_default(true)
        .derive_debug(true)
        .prepend_enum_name(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    if let Some(dir) = &include_dir {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen failed on <infiniband/verbs.h> / <rdma/rdma_cma.h>: is libibverbs-dev and librdmacm-dev installed?");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR not set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");
}
