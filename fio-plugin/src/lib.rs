//! fio external ioengine: `fio --ioengine=external:target/release/libnvmf_p2p_fio.so`.
//!
//! Drives our userspace NVMe-oF/RDMA initiator (`mode=nvmf`), direct-mode queues
//! (`mode=direct`) and our VFIO NVMe driver (`mode=local`) from fio, modelled on SPDK's
//! fio plugin: an ops table, one state per fio thread owning its own queue pair, buffers
//! handed to fio from registered memory (`iomem_alloc`), `queue` without blocking,
//! `commit` publishing the batch, `getevents` polling. See README "fio engine" and
//! FACTS.md "fio external engines".
//!
//! fio loads the library with dlopen and calls [`get_ioengine`]; it first checks that the
//! running fio is the version the engine was built against (its headers are bound by
//! `build.rs` from the installed fio's source tree that `scripts/setup` prepares).

mod direct;
mod engine;
mod local;
mod nvmf;
mod options;

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::OnceLock;

/// fio's structures, bound by bindgen from the fio source tree (build.rs).
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unnecessary_transmutes,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
pub mod sys {
    include!(concat!(env!("OUT_DIR"), "/fio.rs"));
}

/// The fio version (FIO-VERSION-GEN `DEF_VER`) whose headers the engine was built with.
pub const BUILT_FOR_FIO: &str = env!("NVMF_P2P_FIO_BUILT_FOR");
/// The engine ABI version of those headers.
pub const BUILT_FOR_IOOPS: u32 = sys::FIO_IOOPS_VERSION;

/// Test builds count the heap allocations of the I/O callbacks (see engine::Counting).
#[cfg(feature = "vm-tests")]
#[global_allocator]
static GLOBAL: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

/// Prefix of every message the engine prints.
pub(crate) const WHO: &str = "nvmf-p2p fio engine";

/// The sentence printed when the running fio is not the one the engine was built for.
pub fn version_mismatch(running: &str) -> Option<String> {
    (running != BUILT_FOR_FIO).then(|| {
        format!(
            "{WHO}: built for {BUILT_FOR_FIO} (ioengine ABI {BUILT_FOR_IOOPS}) but loaded by {running}; \
             rebuild it against this fio's source (scripts/setup fetches it, or set NVMF_P2P_FIO_SRC)"
        )
    })
}

/// The running fio's version string (`fio_version_string`, exported by the fio binary).
fn running_fio_version() -> Option<String> {
    // SAFETY: dlsym on the global namespace with a NUL-terminated name; the result is only
    // used as a NUL-terminated string constant, which fio defines it to be.
    unsafe {
        let p = libc::dlsym(libc::RTLD_DEFAULT, c"fio_version_string".as_ptr());
        if p.is_null() {
            return None;
        }
        Some(
            CStr::from_ptr(p.cast::<c_char>())
                .to_string_lossy()
                .into_owned(),
        )
    }
}

struct Ops(*mut sys::ioengine_ops);
// SAFETY: the table is built once and then only read (and its dlhandle written) by fio
// under its own job-setup serialisation.
unsafe impl Send for Ops {}
// SAFETY: as above.
unsafe impl Sync for Ops {}

fn ops_table() -> *mut sys::ioengine_ops {
    static OPS: OnceLock<Ops> = OnceLock::new();
    OPS.get_or_init(|| {
        use sys::fio_ioengine_flags::*;
        let ops = sys::ioengine_ops {
            name: c"nvmf-p2p".as_ptr(),
            version: sys::FIO_IOOPS_VERSION as c_int,
            // No disk behind fio's file names, nothing to extend, no disk stats; buffers
            // page-aligned (PRPs, MR offsets).
            flags: (FIO_DISKLESSIO | FIO_NOEXTEND | FIO_NODISKUTIL | FIO_RAWIO | FIO_MEMALIGN)
                as c_int,
            setup: Some(engine::setup),
            init: Some(engine::init),
            queue: Some(engine::queue),
            commit: Some(engine::commit),
            getevents: Some(engine::getevents),
            event: Some(engine::event),
            cleanup: Some(engine::cleanup),
            open_file: Some(engine::open_file),
            close_file: Some(engine::close_file),
            iomem_alloc: Some(engine::iomem_alloc),
            iomem_free: Some(engine::iomem_free),
            option_struct_size: std::mem::size_of::<options::EngineOptions>() as c_int,
            options: options::table(),
            ..Default::default()
        };
        Ops(Box::into_raw(Box::new(ops)))
    })
    .0
}

/// Entry point fio looks up after dlopen (there is deliberately no `ioengine` symbol, so
/// the version check below always runs). Leaves `*out` NULL — fio then says the engine is
/// not loadable — when the running fio is not the one the headers came from.
///
/// # Safety
/// `out` must be a valid pointer, as fio passes it.
#[no_mangle]
pub unsafe extern "C" fn get_ioengine(out: *mut *mut sys::ioengine_ops) {
    if out.is_null() {
        return;
    }
    let running = running_fio_version().unwrap_or_else(|| "a program that is not fio".into());
    if let Some(msg) = version_mismatch(&running) {
        eprintln!("{msg}");
        return;
    }
    // SAFETY: `out` is non-null and points to fio's local, per the contract.
    unsafe { *out = ops_table() };
}

/// errno values fio understands for `io_u->error` and `td->error`.
pub(crate) const EIO: c_uint = libc::EIO as c_uint;
pub(crate) const EINVAL: c_uint = libc::EINVAL as c_uint;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn built_for_the_installed_fio() {
        // The fio on PATH is the one whose source scripts/setup fetched.
        let out = std::process::Command::new("fio").arg("--version").output();
        let Ok(out) = out else {
            eprintln!("skipped: no fio on PATH");
            return;
        };
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(v, BUILT_FOR_FIO, "fio on PATH vs the headers' version");
        assert!(version_mismatch(&v).is_none());
        let m = version_mismatch("fio-3.99").expect("mismatch");
        assert!(m.contains("fio-3.99") && m.contains(BUILT_FOR_FIO), "{m}");
    }

    #[test]
    fn ioops_layout_is_fio_3_33s() {
        // FACTS.md: FIO_IOOPS_VERSION 31 in fio 3.33. Offsets of the fields fio reads, as
        // laid out by struct ioengine_ops of that version (x86-64).
        assert_eq!(BUILT_FOR_IOOPS, 31);
        assert_eq!(offset_of!(sys::ioengine_ops, name), 16);
        assert_eq!(offset_of!(sys::ioengine_ops, version), 24);
        assert_eq!(offset_of!(sys::ioengine_ops, flags), 28);
        assert_eq!(offset_of!(sys::ioengine_ops, setup), 40);
        assert_eq!(offset_of!(sys::ioengine_ops, queue), 72);
        assert_eq!(offset_of!(sys::ioengine_ops, iomem_alloc), 184);
        assert_eq!(offset_of!(sys::ioengine_ops, option_struct_size), 248);
        assert_eq!(offset_of!(sys::ioengine_ops, options), 256);
        assert_eq!(size_of::<sys::ioengine_ops>(), 264);
    }

    #[test]
    fn ops_table_is_complete() {
        // SAFETY: the table is a leaked, initialised Box.
        let ops = unsafe { &*ops_table() };
        assert_eq!(ops.version, 31);
        assert!(ops.queue.is_some() && ops.getevents.is_some() && ops.event.is_some());
        assert!(ops.iomem_alloc.is_some() && ops.iomem_free.is_some());
        assert!(!ops.options.is_null());
    }
}
