//! The engine's fio options (`mode=`, `traddr=`, ...) and their parsed form.
//!
//! fio fills [`EngineOptions`] (allocated with `option_struct_size`, at `td->eo`) from
//! the option table: strings are `FIO_OPT_STR_STORE` (fio strdup()s them), numbers
//! `FIO_OPT_INT` (an `unsigned int`).

use std::ffi::{c_char, c_uint, c_void, CStr};
use std::mem::offset_of;
use std::net::{IpAddr, SocketAddr};

use transport::direct::host::Completions;

use crate::sys;

/// What fio fills in, at the offsets the option table names.
#[repr(C)]
pub struct EngineOptions {
    /// fio treats an option offset of 0 as "none": keep the first field unused.
    _pad: *mut c_void,
    mode: *mut c_char,
    traddr: *mut c_char,
    trsvcid: c_uint,
    subnqn: *mut c_char,
    hostnqn: *mut c_char,
    nsid: c_uint,
    completions: *mut c_char,
    bdf: *mut c_char,
}

/// How the engine reaches the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// NVMe-oF/RDMA through our initiator.
    Nvmf,
    /// Direct-mode queues.
    Direct,
    /// A local controller through our VFIO driver.
    Local,
}

/// The parsed options of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// Target (nvmf, direct).
    pub dst: Option<SocketAddr>,
    pub subnqn: String,
    pub hostnqn: String,
    pub nsid: u32,
    pub completions: Completions,
    /// Controller (local).
    pub bdf: Option<String>,
}

fn opt(
    name: &'static CStr,
    lname: &'static CStr,
    type_: sys::fio_opt_type::Type,
    off: usize,
    def: Option<&'static CStr>,
    help: &'static CStr,
) -> sys::fio_option {
    sys::fio_option {
        name: name.as_ptr(),
        lname: lname.as_ptr(),
        type_,
        off1: off as c_uint,
        def: def.map_or(std::ptr::null(), CStr::as_ptr),
        help: help.as_ptr(),
        category: u64::from(sys::opt_category::FIO_OPT_C_ENGINE),
        group: sys::opt_category_group::FIO_OPT_G_INVALID,
        ..Default::default()
    }
}

/// The option table fio parses engine options with (leaked once; NULL-name terminated).
pub fn table() -> *mut sys::fio_option {
    use sys::fio_opt_type::{FIO_OPT_INT, FIO_OPT_STR_STORE};
    let v = vec![
        opt(
            c"mode",
            c"nvmf-p2p mode",
            FIO_OPT_STR_STORE,
            offset_of!(EngineOptions, mode),
            Some(c"nvmf"),
            c"nvmf (NVMe-oF/RDMA), direct (direct-mode queues) or local (VFIO NVMe)",
        ),
        opt(
            c"traddr",
            c"target address",
            FIO_OPT_STR_STORE,
            offset_of!(EngineOptions, traddr),
            None,
            c"IP address of the NVMe-oF/RDMA target (nvmf, direct)",
        ),
        opt(
            c"trsvcid",
            c"target port",
            FIO_OPT_INT,
            offset_of!(EngineOptions, trsvcid),
            Some(c"4420"),
            c"port of the NVMe-oF/RDMA target",
        ),
        opt(
            c"subnqn",
            c"subsystem NQN",
            FIO_OPT_STR_STORE,
            offset_of!(EngineOptions, subnqn),
            None,
            c"NQN of the subsystem to connect to (nvmf, direct)",
        ),
        opt(
            c"hostnqn",
            c"host NQN",
            FIO_OPT_STR_STORE,
            offset_of!(EngineOptions, hostnqn),
            None,
            c"our host NQN (default: the one nvmf-p2p perf uses)",
        ),
        opt(
            c"nsid",
            c"namespace id",
            FIO_OPT_INT,
            offset_of!(EngineOptions, nsid),
            Some(c"1"),
            c"namespace to do I/O on",
        ),
        opt(
            c"completions",
            c"direct-mode completions",
            FIO_OPT_STR_STORE,
            offset_of!(EngineOptions, completions),
            Some(c"pushed"),
            c"direct mode: pushed by the target or polled by this host",
        ),
        opt(
            c"bdf",
            c"PCI address",
            FIO_OPT_STR_STORE,
            offset_of!(EngineOptions, bdf),
            None,
            c"local mode: PCI address of the controller bound to vfio-pci (or give it as filename)",
        ),
        sys::fio_option::default(),
    ];
    Box::leak(v.into_boxed_slice()).as_mut_ptr()
}

fn text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: fio stores NUL-terminated strdup()ed strings (or NULL) in STR_STORE fields.
    let s = unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_string();
    (!s.is_empty()).then_some(s)
}

/// A PCI address from fio's `filename` (where `:` separates file names, so `0000.01.00.0`
/// or an escaped `0000\:01\:00.0` is accepted as well as the plain form).
pub fn bdf_from_filename(name: &str) -> Option<String> {
    let s = name.replace("\\:", ":");
    let parts: Vec<&str> = s.split(['.', ':']).collect();
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    match parts.as_slice() {
        [d, b, s, f] if hex(d, 4) && hex(b, 2) && hex(s, 2) && hex(f, 1) => {
            Some(format!("{d}:{b}:{s}.{f}"))
        }
        [b, s, f] if hex(b, 2) && hex(s, 2) && hex(f, 1) => Some(format!("0000:{b}:{s}.{f}")),
        _ => None,
    }
}

impl Config {
    /// Parses what fio stored in `eo`; `filename` is the job's first file name.
    ///
    /// # Safety
    /// `eo` must be NULL or point to an [`EngineOptions`] filled by fio.
    pub unsafe fn from_fio(
        eo: *const EngineOptions,
        filename: Option<&str>,
    ) -> Result<Config, String> {
        // SAFETY: per the contract.
        let Some(o) = (unsafe { eo.as_ref() }) else {
            return Err("fio passed no engine options".into());
        };
        Config::parse(
            text(o.mode).as_deref(),
            text(o.traddr).as_deref(),
            o.trsvcid,
            text(o.subnqn),
            text(o.hostnqn),
            o.nsid,
            text(o.completions).as_deref(),
            text(o.bdf).or_else(|| filename.and_then(bdf_from_filename)),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn parse(
        mode: Option<&str>,
        traddr: Option<&str>,
        trsvcid: u32,
        subnqn: Option<String>,
        hostnqn: Option<String>,
        nsid: u32,
        completions: Option<&str>,
        bdf: Option<String>,
    ) -> Result<Config, String> {
        let mode = match mode.unwrap_or("nvmf") {
            "nvmf" => Mode::Nvmf,
            "direct" => Mode::Direct,
            "local" => Mode::Local,
            m => {
                return Err(format!(
                    "mode={m} is not a mode: use mode=nvmf, mode=direct or mode=local"
                ))
            }
        };
        if nsid == 0 || nsid == u32::MAX {
            return Err(format!("nsid={nsid} is not a namespace id (1, 2, ...)"));
        }
        let completions = match completions.unwrap_or("pushed") {
            "pushed" => Completions::Pushed,
            "polled" => Completions::Polled,
            c => {
                return Err(format!(
                    "completions={c}: use completions=pushed or completions=polled"
                ))
            }
        };
        let mut c = Config {
            mode,
            dst: None,
            subnqn: String::new(),
            hostnqn: hostnqn.unwrap_or_else(|| transport::nvmf_rdma::DEFAULT_HOSTNQN.to_string()),
            nsid,
            completions,
            bdf: None,
        };
        match mode {
            Mode::Local => {
                let Some(b) = bdf else {
                    return Err("mode=local needs the controller's PCI address: bdf=0000:01:00.0 (or filename=0000.01.00.0)".into());
                };
                c.bdf = Some(b);
            }
            Mode::Nvmf | Mode::Direct => {
                let Some(a) = traddr else {
                    return Err(
                        "traddr= is required: the IP address of the NVMe-oF/RDMA target".into(),
                    );
                };
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| format!("traddr={a} is not an IP address"))?;
                let port = u16::try_from(trsvcid)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("trsvcid={trsvcid} is not a port"))?;
                c.dst = Some(SocketAddr::new(ip, port));
                c.subnqn =
                    subnqn.ok_or("subnqn= is required: the NQN of the subsystem to connect to")?;
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvmf(traddr: Option<&str>, subnqn: Option<&str>) -> Result<Config, String> {
        Config::parse(
            Some("nvmf"),
            traddr,
            4420,
            subnqn.map(Into::into),
            None,
            1,
            None,
            None,
        )
    }

    #[test]
    fn options_parse_with_defaults_and_clear_errors() {
        let c = nvmf(Some("10.0.0.1"), Some("nqn.x")).unwrap();
        assert_eq!(c.dst, Some("10.0.0.1:4420".parse().unwrap()));
        assert_eq!(c.hostnqn, transport::nvmf_rdma::DEFAULT_HOSTNQN);
        assert_eq!(c.completions, Completions::Pushed);
        assert!(nvmf(None, Some("n")).unwrap_err().contains("traddr="));
        assert!(nvmf(Some("x.y"), Some("n"))
            .unwrap_err()
            .contains("not an IP"));
        assert!(nvmf(Some("10.0.0.1"), None)
            .unwrap_err()
            .contains("subnqn="));
        let e = Config::parse(Some("fast"), None, 4420, None, None, 1, None, None).unwrap_err();
        assert!(e.contains("mode=fast"), "{e}");
        let e = Config::parse(Some("local"), None, 4420, None, None, 1, None, None).unwrap_err();
        assert!(e.contains("bdf="), "{e}");
        let e = Config::parse(
            Some("direct"),
            Some("::1"),
            4420,
            Some("n".into()),
            None,
            1,
            Some("maybe"),
            None,
        )
        .unwrap_err();
        assert!(e.contains("completions=maybe"), "{e}");
        assert!(Config::parse(
            None,
            Some("::1"),
            70000,
            Some("n".into()),
            None,
            1,
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn bdfs_from_fio_filenames() {
        assert_eq!(
            bdf_from_filename("0000.01.00.0").as_deref(),
            Some("0000:01:00.0")
        );
        assert_eq!(
            bdf_from_filename("0000\\:01\\:00.0").as_deref(),
            Some("0000:01:00.0")
        );
        assert_eq!(
            bdf_from_filename("00:03.0").as_deref(),
            Some("0000:00:03.0")
        );
        assert_eq!(bdf_from_filename("job.0.0"), None);
        assert_eq!(bdf_from_filename("/dev/nvme0n1"), None);
    }

    #[test]
    fn table_is_terminated_and_offsets_are_nonzero() {
        let t = table();
        let mut n = 0;
        // SAFETY: the table is a leaked slice ending with a NULL-name entry.
        unsafe {
            while !(*t.add(n)).name.is_null() {
                assert_ne!((*t.add(n)).off1, 0);
                n += 1;
            }
        }
        assert_eq!(n, 8);
    }
}
