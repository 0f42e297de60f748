//! Binds `struct ioengine_ops`, `struct thread_data`, `struct io_u`, `struct fio_file` and
//! `struct fio_option` from the source tree of the installed fio, configured by
//! `scripts/setup` (step 3b, `scripts/lib/fio-source.sh`) in
//! `${XDG_CACHE_HOME:-$HOME/.cache}/nvmf-p2p/fio-src`; `NVMF_P2P_FIO_SRC` overrides it.
//!
//! Equivalent bindgen command:
//!
//! ```text
//! bindgen wrapper.h --allowlist-type 'ioengine_ops|thread_data|io_u|fio_file|fio_option' \
//!   --allowlist-var 'FIO_IOOPS_VERSION|FIO_.*' --with-derive-default -- \
//!   -I$FIO_SRC -D_GNU_SOURCE -D_LARGEFILE_SOURCE -D_FILE_OFFSET_BITS=64 -DFIO_INTERNAL
//! ```
//!
//! It also records the fio version the tree is (`DEF_VER` of FIO-VERSION-GEN, e.g.
//! `fio-3.33`) as `NVMF_P2P_FIO_BUILT_FOR`, which the engine compares with the running fio.

use std::env;
use std::path::PathBuf;

fn fio_src() -> PathBuf {
    if let Some(p) = env::var_os("NVMF_P2P_FIO_SRC") {
        return PathBuf::from(p);
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    cache.join("nvmf-p2p/fio-src")
}

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=NVMF_P2P_FIO_SRC");
    println!("cargo:rerun-if-env-changed=XDG_CACHE_HOME");
    let src = fio_src();
    let config = src.join("config-host.h");
    println!("cargo:rerun-if-changed={}", config.display());
    if !config.is_file() {
        panic!(
            "no configured fio source tree at {} (config-host.h missing): run scripts/setup, \
             or set NVMF_P2P_FIO_SRC to a fio source tree of the installed version on which \
             ./configure has run",
            src.display()
        );
    }
    let gen = std::fs::read_to_string(src.join("FIO-VERSION-GEN")).unwrap_or_default();
    let version = gen
        .lines()
        .find_map(|l| l.strip_prefix("DEF_VER="))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("{}: no DEF_VER line", src.join("FIO-VERSION-GEN").display()));
    println!("cargo:rustc-env=NVMF_P2P_FIO_BUILT_FOR={version}");
    println!("cargo:rustc-env=NVMF_P2P_FIO_SRC_DIR={}", src.display());

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg(format!("-I{}", src.display()))
        .clang_args([
            "-D_GNU_SOURCE",
            "-D_LARGEFILE_SOURCE",
            "-D_FILE_OFFSET_BITS=64",
            "-DFIO_INTERNAL",
        ])
        .allowlist_type("ioengine_ops")
        .allowlist_type("thread_data")
        .allowlist_type("io_u")
        .allowlist_type("fio_file")
        .allowlist_type("fio_option")
        .allowlist_type("fio_ddir")
        .allowlist_type("fio_q_status")
        .allowlist_type("fio_ioengine_flags")
        .allowlist_type("fio_opt_type")
        .allowlist_type("opt_category")
        .allowlist_type("opt_category_group")
        // fio's statistics are not read by the engine; bindgen cannot lay thread_stat out
        // (8 bytes short), so it is an opaque blob of clang's size.
        .opaque_type("thread_stat")
        .allowlist_var("FIO_IOOPS_VERSION")
        .allowlist_var("FIO_OPT_.*")
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "bindgen failed on the fio headers in {}: {e}",
                src.display()
            )
        });
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("fio.rs");
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
