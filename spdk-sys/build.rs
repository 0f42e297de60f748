//! With the `spdk` feature: generate bindings to an installed SPDK found by pkg-config.
//! Without it: nothing to do; the crate is empty.

fn main() {
    #[cfg(feature = "spdk")]
    spdk::generate();
}

#[cfg(feature = "spdk")]
mod spdk {
    use std::{env, path::PathBuf, process::Command};

    fn pkg_config(args: &[&str]) -> String {
        let out = Command::new("pkg-config")
            .args(args)
            .output()
            .expect("pkg-config is needed for the `spdk` feature (apt-get install pkg-config)");
        if !out.status.success() {
            panic!(
                "pkg-config {:?} failed: SPDK not found. Build SPDK v25.09 from source, install it, \
                 and set PKG_CONFIG_PATH to its lib/pkgconfig directory.",
                args
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn generate() {
        let cflags = pkg_config(&["--cflags", "spdk_nvme", "spdk_env_dpdk"]);
        let libs = pkg_config(&["--libs", "spdk_nvme", "spdk_env_dpdk"]);
        let sys = pkg_config(&["--libs", "--static", "spdk_syslibs"]);
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        for tok in libs.split_whitespace().chain(sys.split_whitespace()) {
            if let Some(dir) = tok.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={dir}");
            } else if let Some(lib) = tok.strip_prefix("-l") {
                println!("cargo:rustc-link-lib={lib}");
            } else {
                println!("cargo:rustc-link-arg={tok}");
            }
        }
        let bindings = bindgen::Builder::default()
            .header_contents("spdk.h", "#include <spdk/nvme.h>\n#include <spdk/env.h>\n")
            .clang_args(cflags.split_whitespace())
            .allowlist_function("spdk_.*")
            .allowlist_type("spdk_.*")
            .allowlist_var("SPDK_.*")
            .derive_default(true)
            .generate()
            .expect("bindgen failed on the SPDK headers");
        let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("spdk.rs");
        bindings.write_to_file(out).expect("write spdk.rs");
    }
}
