//! Bindgen bindings to an installed SPDK (`spdk_nvme`, `spdk_env_dpdk`), behind the
//! off-by-default cargo feature `spdk`. Without the feature this crate is empty.
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#![allow(clippy::all)]

#[cfg(feature = "spdk")]
include!(concat!(env!("OUT_DIR"), "/spdk.rs"));
