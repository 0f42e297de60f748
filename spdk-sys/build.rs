//! With the `spdk` feature: bindings to the SPDK that `scripts/setup` built, and its link
//! line. Without it: nothing to do; the crate is empty.
//!
//! Where SPDK is: `NVMF_P2P_SPDK_PREFIX` if set, else the path in
//! `${XDG_CACHE_HOME:-$HOME/.cache}/nvmf-p2p/spdk-prefix` (written by
//! `scripts/lib/spdk-build.sh` once the build passed its checks). That directory is an SPDK
//! build tree: headers in `include/`, SPDK's shared libraries and `.pc` files in
//! `build/lib`, DPDK's in `dpdk/build/lib`.
//!
//! The bindgen invocation is equivalent to:
//!
//! ```text
//! bindgen wrapper.h --allowlist-function 'spdk_.*' --allowlist-type 'spdk_.*' \
//!   --allowlist-var 'SPDK_.*' --with-derive-default -- $(pkg-config --cflags spdk_nvme spdk_env_dpdk)
//! ```
//! with `wrapper.h` including `<spdk/nvme.h>`, `<spdk/env.h>`, DPDK's `<rte_vfio.h>` (for
//! `rte_vfio_get_group_fd`: direct mode exports dma-bufs from the VFIO device SPDK opened)
//! and `shim/shim.h`. Neither SPDK header has a `static inline` the backend needs (only
//! `spdk_nvme_trtype_is_fabrics`). The one C shim, `shim/shim.c`, reads a field SPDK keeps
//! in its private `lib/nvme/nvme_internal.h` (the controller's shadow doorbell pages, which
//! a direct queue created behind SPDK's back must ring through); it is compiled with `cc`
//! against that header of the same SPDK tree.
//!
//! Linking (FACTS.md "SPDK"): every library of `pkg-config --libs spdk_nvme spdk_env_dpdk`
//! without `--as-needed` (DPDK's mempool ring driver, for one, registers itself from a
//! constructor and nothing references it by symbol; `libspdk_env_dpdk.so` does not list
//! DPDK as needed), then `pkg-config --libs --static spdk_syslibs`, then an rpath to the
//! library directories so binaries run without `LD_LIBRARY_PATH`. Cargo keeps link args
//! (and the `as-needed` link modifier is nightly-only) to the package that emits them, so
//! this crate's tests get them directly and dependents that build binaries re-emit the
//! `DEP_SPDK_LINK_ARGS` metadata (`links = "spdk"`) from their own build script
//! (nvmf-p2p's `build.rs`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "spdk")]
    spdk::generate();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::{env, fs};

    /// The one sentence a build without SPDK prints.
    fn no_spdk(detail: &str) -> ! {
        eprintln!(
            "error: the `spdk` feature needs SPDK, which is not installed ({detail}): run scripts/setup, then rebuild"
        );
        std::process::exit(1);
    }

    fn prefix() -> PathBuf {
        println!("cargo:rerun-if-env-changed=NVMF_P2P_SPDK_PREFIX");
        println!("cargo:rerun-if-env-changed=XDG_CACHE_HOME");
        if let Some(p) = env::var_os("NVMF_P2P_SPDK_PREFIX") {
            return PathBuf::from(p);
        }
        let cache = env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| no_spdk("neither XDG_CACHE_HOME nor HOME is set"));
        let file = cache.join("nvmf-p2p/spdk-prefix");
        println!("cargo:rerun-if-changed={}", file.display());
        match fs::read_to_string(&file) {
            Ok(s) => PathBuf::from(s.trim()),
            Err(_) => no_spdk(&format!("{} does not exist", file.display())),
        }
    }

    fn pkg_config(pc_path: &str, args: &[&str]) -> String {
        let out = Command::new("pkg-config")
            .env("PKG_CONFIG_PATH", pc_path)
            .args(args)
            .output()
            .unwrap_or_else(|e| no_spdk(&format!("pkg-config did not run: {e}")));
        if !out.status.success() {
            no_spdk(&format!(
                "pkg-config {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn generate() {
        let prefix = prefix();
        let lib = prefix.join("build/lib");
        let dpdk_lib = prefix.join("dpdk/build/lib");
        for f in [
            prefix.join("include/spdk/nvme.h"),
            lib.join("pkgconfig/spdk_nvme.pc"),
        ] {
            if !f.exists() {
                no_spdk(&format!("{} is missing", f.display()));
            }
        }
        let pc_path = format!(
            "{}:{}",
            lib.join("pkgconfig").display(),
            dpdk_lib.join("pkgconfig").display()
        );
        let cflags = pkg_config(&pc_path, &["--cflags", "spdk_nvme", "spdk_env_dpdk"]);
        let libs = pkg_config(&pc_path, &["--libs", "spdk_nvme", "spdk_env_dpdk"]);
        let sys = pkg_config(&pc_path, &["--libs", "--static", "spdk_syslibs"]);

        // The final link: SPDK's and DPDK's libraries without --as-needed, then the
        // system libraries, then the rpath. Link args stay in the package that emits them,
        // so they also go out as metadata (DEP_SPDK_LINK_ARGS, tab-separated) for the
        // build scripts of dependents that build binaries (nvmf-p2p).
        let mut args = vec!["-Wl,--no-as-needed".to_string()];
        let mut dirs: Vec<String> = Vec::new();
        for tok in libs
            .split_whitespace()
            .chain(["-Wl,--as-needed"])
            .chain(sys.split_whitespace())
        {
            if let Some(dir) = tok.strip_prefix("-L") {
                if !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_string());
                }
            }
            args.push(tok.to_string());
        }
        args.push(format!("-Wl,-rpath,{}", dirs.join(":")));
        for a in &args {
            println!("cargo:rustc-link-arg={a}");
        }
        println!("cargo:link_args={}", args.join("\t"));
        println!("cargo:prefix={}", prefix.display());
        println!(
            "cargo:rerun-if-changed={}",
            prefix.join(".nvmf-p2p-stamp").display()
        );

        let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("shim");
        println!("cargo:rerun-if-changed={}", shim.join("shim.c").display());
        println!("cargo:rerun-if-changed={}", shim.join("shim.h").display());
        let dpdk_include = prefix.join("dpdk/build/include");
        cc::Build::new()
            .file(shim.join("shim.c"))
            .include(&shim)
            .include(prefix.join("lib/nvme"))
            .include(prefix.join("include"))
            .include(prefix.join("build/include"))
            .include(&dpdk_include)
            .warnings(false)
            .compile("nvmf_p2p_spdk_shim");

        let bindings = bindgen::Builder::default()
            .header_contents(
                "wrapper.h",
                "#include <spdk/nvme.h>\n#include <spdk/env.h>\n#include <rte_vfio.h>\n#include \"shim.h\"\n",
            )
            .clang_args(cflags.split_whitespace())
            .clang_arg(format!("-I{}", prefix.join("include").display()))
            .clang_arg(format!("-I{}", dpdk_include.display()))
            .clang_arg(format!("-I{}", shim.display()))
            .allowlist_function("spdk_.*")
            .allowlist_function("rte_vfio_get_group_fd")
            .allowlist_function("nvmf_p2p_spdk_.*")
            .allowlist_type("spdk_.*")
            .allowlist_var("SPDK_.*")
            .derive_default(true)
            .generate()
            .unwrap_or_else(|e| {
                no_spdk(&format!(
                    "bindgen failed on the headers in {}: {e}",
                    Path::new(&prefix).join("include").display()
                ))
            });
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("spdk.rs");
        bindings
            .write_to_file(&out)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    }
}
