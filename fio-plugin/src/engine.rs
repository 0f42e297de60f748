//! The ops table's callbacks and the state each fio thread owns (`td->io_ops_data`).
//!
//! Life of a job: `setup` (fio's main thread, once per job clone) parses the options,
//! connects once to learn the namespace size and parks that connection for the job's
//! thread; `init` (the job's thread) takes it and opens the thread's own queue pair;
//! `iomem_alloc` registers fio's I/O buffers as one pool (RDMA MR or VFIO DMA memory);
//! `queue` puts a command in the queue without blocking, `commit` publishes the batch,
//! `getevents` polls and `event` hands the completed io_us back; `cleanup` closes.
//!
//! Every callback catches panics (fio is C: unwinding into it would abort) and reports
//! failures as one sentence on stderr plus an errno in `td->error` / `io_u->error`.

use std::ffi::{c_int, c_uint, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::options::{Config, EngineOptions, Mode};
use crate::sys::{self, fio_ddir, fio_q_status, io_u, thread_data};
use crate::{direct, local, nvmf, EINVAL, EIO, WHO};

/// One I/O as the backends see it.
pub struct IoReq {
    pub ddir: fio_ddir::Type,
    /// Byte offset on the namespace.
    pub offset: u64,
    /// Transfer length in bytes.
    pub len: usize,
    /// fio's buffer for it (inside the pool from `iomem_alloc`).
    pub buf: *mut u8,
    /// The io_u, returned in the completion.
    pub tag: u64,
    /// fio's index of the io_u (< iodepth): a per-io_u slot for side data (DSM ranges).
    pub index: usize,
}

impl IoReq {
    /// The request as blocks of `1 << shift` bytes: `(slba, nlb)`, or the sentence that
    /// says why it is not in whole blocks.
    pub fn blocks(&self, shift: u32) -> Result<(u64, u64), String> {
        let mask = (1u64 << shift) - 1;
        if self.offset & mask != 0 || self.len as u64 & mask != 0 {
            return Err(format!(
                "I/O of {} bytes at offset {} is not in whole {}-byte blocks",
                self.len,
                self.offset,
                1u64 << shift
            ));
        }
        Ok((self.offset >> shift, (self.len as u64) >> shift))
    }
}

/// What `queue` did with a request.
pub enum Queued {
    /// In the queue; completes through `getevents`.
    Yes,
    /// No room: fio should `commit` and reap first.
    Busy,
}

/// A backend: one queue pair of one thread.
pub trait Backend {
    /// Registers `len` bytes for fio's buffers; returns their base.
    fn alloc_pool(&mut self, len: usize) -> Result<*mut u8, String>;
    /// Releases the pool (no I/O is outstanding).
    fn free_pool(&mut self);
    /// Queues `r` without blocking; an `Err` is the errno to complete it with.
    fn queue(&mut self, r: &IoReq) -> Result<Queued, c_uint>;
    /// Publishes what `queue` queued (doorbell / post).
    fn commit(&mut self) -> Result<(), String>;
    /// Reaps up to `max` completions: `done(tag, errno)` for each (0 = success).
    fn poll(&mut self, max: usize, done: &mut dyn FnMut(u64, c_uint)) -> Result<usize, String>;
}

/// The thread's state at `td->io_ops_data`.
struct Thread {
    backend: Box<dyn Backend>,
    /// io_us completed by the last `getevents`, read back by `event`.
    events: Vec<*mut io_u>,
    /// Set once a failure has been printed (one sentence per thread, not one per I/O).
    reported: bool,
    /// The io_us the backend holds, by fio's io_u index (< iodepth): when the queue is
    /// lost they are completed with EIO, since fio waits for every io_u in flight.
    inflight: Vec<*mut io_u>,
    /// The backend's queue is gone (target died, link lost): every io_u fails with EIO.
    lost: bool,
}

impl Thread {
    /// After a fatal backend error: io_us still in flight become EIO events, after the
    /// events already reaped, up to `max` in all (the rest on the next call).
    fn fail_inflight(&mut self, max: usize) -> usize {
        self.lost = true;
        for slot in self.inflight.iter_mut() {
            if self.events.len() >= max {
                break;
            }
            if slot.is_null() {
                continue;
            }
            let u = std::mem::replace(slot, std::ptr::null_mut());
            // SAFETY: an io_u queued to the backend and not completed: still ours.
            unsafe {
                (*u).error = EIO;
                (*u).resid = (*u).xfer_buflen;
            }
            self.events.push(u);
        }
        self.events.len()
    }
}

/// fio's index of `u` (set at io_u allocation, < iodepth).
///
/// # Safety
/// `u` is a valid io_u.
unsafe fn index_of(u: *mut io_u) -> usize {
    // SAFETY: the caller's io_u; the engine uses only the union's `index` member.
    unsafe { (*u).__bindgen_anon_1.index as usize }
}

/// While alive, heap allocations of this thread are counted (test builds: feature
/// `vm-tests`; the I/O callbacks must allocate nothing).
struct Counting;

impl Counting {
    fn on() -> Counting {
        #[cfg(feature = "vm-tests")]
        alloc_count::count_this_thread(true);
        Counting
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        #[cfg(feature = "vm-tests")]
        alloc_count::count_this_thread(false);
    }
}

fn say(msg: &str) {
    // One write(2) for the whole line: eprintln! writes its pieces one by one, and fio's
    // threads write to the same stderr in between.
    use std::io::Write;
    let line = format!("{WHO}: {msg}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Runs a callback body, turning a panic into `fail`.
fn guarded<T>(fail: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            say("internal error (panic) in the engine; see the message above");
            fail
        }
    }
}

/// # Safety
/// `td` is the valid thread_data fio passes to every callback.
unsafe fn td_ref<'a>(td: *mut thread_data) -> &'a mut thread_data {
    // SAFETY: per the contract; fio calls a job's callbacks from one thread at a time.
    unsafe { &mut *td }
}

fn thread(td: &mut thread_data) -> Option<&mut Thread> {
    // SAFETY: io_ops_data is NULL or the Box<Thread> that init leaked.
    unsafe { td.io_ops_data.cast::<Thread>().as_mut() }
}

/// The job's files (fio keeps `files_index` of them in `td->files`).
fn files(td: &mut thread_data) -> &mut [*mut sys::fio_file] {
    if td.files.is_null() {
        return &mut [];
    }
    // SAFETY: fio's array of `files_index` file pointers.
    unsafe { std::slice::from_raw_parts_mut(td.files, td.files_index as usize) }
}

fn first_filename(td: &mut thread_data) -> Option<String> {
    let f = *files(td).first()?;
    // SAFETY: a file of this job; file_name is NULL or a C string fio owns.
    unsafe {
        let name = (*f).file_name;
        (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}

fn config(td: &mut thread_data) -> Result<Config, String> {
    let name = first_filename(td);
    // SAFETY: td->eo is the option struct fio allocated with our option_struct_size.
    unsafe { Config::from_fio(td.eo.cast::<EngineOptions>(), name.as_deref()) }
}

fn shape(td: &thread_data) -> direct::Shape {
    direct::Shape {
        iodepth: td.o.iodepth.clamp(1, 4096) as u16,
        max_bs: td.o.max_bs[0].max(td.o.max_bs[1]),
    }
}

fn fail_td(td: &mut thread_data, msg: &str) -> c_int {
    say(msg);
    td.error = EINVAL as c_int;
    // fio prints "err=<errno>/<verror>" for the job: give it the sentence too.
    let n = msg.len().min(td.verror.len() - 1);
    for (d, s) in td.verror.iter_mut().zip(&msg.as_bytes()[..n]) {
        *d = *s as std::ffi::c_char;
    }
    td.verror[n] = 0;
    1
}

/// What a parked connection is keyed by: the parsed options (same job clone → same key).
pub(crate) type Key = Config;

fn check_loaded_as_ours(td: &mut thread_data) -> Result<(), String> {
    // A cheap check that the bound thread_data layout is the running fio's: fio sets
    // td->io_ops to our table before any callback.
    if td.io_ops != crate::ops_table() {
        return Err(format!(
            "fio's thread_data does not match the headers the engine was built with ({}); rebuild it against this fio",
            crate::BUILT_FOR_FIO
        ));
    }
    Ok(())
}

pub(crate) unsafe extern "C" fn setup(td: *mut thread_data) -> c_int {
    guarded(1, || {
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        if let Err(e) = check_loaded_as_ours(td) {
            return fail_td(td, &e);
        }
        let cfg = match config(td) {
            Ok(c) => c,
            Err(e) => return fail_td(td, &e),
        };
        let threads = td.o.use_thread != 0;
        if cfg.mode == Mode::Local && !threads && td.o.numjobs > 1 {
            return fail_td(
                td,
                "mode=local with numjobs>1 needs thread=1: job processes cannot share one VFIO device",
            );
        }
        let size = match cfg.mode {
            Mode::Nvmf => nvmf::probe(&cfg, threads),
            Mode::Local => local::probe(&cfg, threads),
            Mode::Direct => direct::probe(&cfg, shape(td), threads),
        };
        let bytes = match size {
            Ok(b) => b,
            Err(e) => return fail_td(td, &e),
        };
        for &f in files(td).iter() {
            // SAFETY: a file of this job, owned by fio.
            unsafe {
                (*f).real_file_size = bytes;
                (*f).filetype = sys::fio_filetype::FIO_TYPE_BLOCK;
                (*f).flags |= sys::fio_file_flags::FIO_FILE_size_known;
            }
        }
        0
    })
}

pub(crate) unsafe extern "C" fn init(td: *mut thread_data) -> c_int {
    guarded(1, || {
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        let cfg = match config(td) {
            Ok(c) => c,
            Err(e) => return fail_td(td, &e),
        };
        let depth = td.o.iodepth.clamp(1, 4096) as u16;
        let backend: Result<Box<dyn Backend>, String> = match cfg.mode {
            Mode::Nvmf => nvmf::Nvmf::open(&cfg, depth).map(|b| Box::new(b) as Box<dyn Backend>),
            Mode::Local => local::Local::open(&cfg, depth).map(|b| Box::new(b) as Box<dyn Backend>),
            Mode::Direct => {
                direct::Direct::open(&cfg, shape(td)).map(|b| Box::new(b) as Box<dyn Backend>)
            }
        };
        let backend = match backend {
            Ok(b) => b,
            Err(e) => return fail_td(td, &e),
        };
        let t = Box::new(Thread {
            backend,
            events: Vec::with_capacity(usize::from(depth)),
            reported: false,
            inflight: vec![std::ptr::null_mut(); usize::from(depth)],
            lost: false,
        });
        td.io_ops_data = Box::into_raw(t).cast();
        0
    })
}

pub(crate) unsafe extern "C" fn cleanup(td: *mut thread_data) {
    guarded((), || {
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        #[cfg(feature = "vm-tests")]
        say(&format!(
            "{} heap allocations in the I/O callbacks",
            alloc_count::take()
        ));
        let p = td.io_ops_data.cast::<Thread>();
        if !p.is_null() {
            td.io_ops_data = std::ptr::null_mut();
            // SAFETY: the Box init leaked, taken back exactly once.
            drop(unsafe { Box::from_raw(p) });
        }
    })
}

pub(crate) unsafe extern "C" fn iomem_alloc(td: *mut thread_data, len: usize) -> c_int {
    guarded(1, || {
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        let Some(t) = thread(td) else {
            return fail_td(td, "iomem_alloc before init");
        };
        match t.backend.alloc_pool(len) {
            Ok(p) => {
                td.orig_buffer = p.cast();
                0
            }
            Err(e) => fail_td(td, &e),
        }
    })
}

pub(crate) unsafe extern "C" fn iomem_free(td: *mut thread_data) {
    guarded((), || {
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        if let Some(t) = thread(td) {
            t.backend.free_pool();
        }
        td.orig_buffer = std::ptr::null_mut();
    })
}

pub(crate) unsafe extern "C" fn open_file(_td: *mut thread_data, _f: *mut sys::fio_file) -> c_int {
    0
}

pub(crate) unsafe extern "C" fn close_file(_td: *mut thread_data, _f: *mut sys::fio_file) -> c_int {
    0
}

pub(crate) unsafe extern "C" fn queue(td: *mut thread_data, u: *mut io_u) -> fio_q_status::Type {
    guarded(fio_q_status::FIO_Q_COMPLETED, || {
        let _count = Counting::on();
        // SAFETY: fio's thread_data and an io_u it owns until we complete it.
        let (td, io) = unsafe { (td_ref(td), &mut *u) };
        let Some(t) = thread(td) else {
            io.error = EIO;
            return fio_q_status::FIO_Q_COMPLETED;
        };
        if t.lost {
            io.error = EIO;
            return fio_q_status::FIO_Q_COMPLETED;
        }
        let r = IoReq {
            ddir: io.ddir,
            offset: io.offset,
            len: io.xfer_buflen as usize,
            buf: io.xfer_buf.cast(),
            tag: u as u64,
            // SAFETY: fio sets io_u->index at io_u allocation; the engine does not use
            // the union's other members.
            index: unsafe { io.__bindgen_anon_1.index } as usize,
        };
        match t.backend.queue(&r) {
            Ok(Queued::Yes) => {
                if let Some(slot) = t.inflight.get_mut(r.index) {
                    *slot = u;
                }
                fio_q_status::FIO_Q_QUEUED
            }
            Ok(Queued::Busy) => fio_q_status::FIO_Q_BUSY,
            Err(errno) => {
                io.error = errno;
                fio_q_status::FIO_Q_COMPLETED
            }
        }
    })
}

pub(crate) unsafe extern "C" fn commit(td: *mut thread_data) -> c_int {
    guarded(-(EIO as c_int), || {
        let _count = Counting::on();
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        let Some(t) = thread(td) else { return 0 };
        if t.lost {
            return 0;
        }
        match t.backend.commit() {
            Ok(()) => 0,
            Err(e) => {
                if !t.reported {
                    t.reported = true;
                    say(&e);
                }
                // the next getevents ends what is in flight
                t.lost = true;
                -(EIO as c_int)
            }
        }
    })
}

pub(crate) unsafe extern "C" fn getevents(
    td: *mut thread_data,
    min: c_uint,
    max: c_uint,
    timeout: *const sys::timespec,
) -> c_int {
    guarded(-(EIO as c_int), || {
        let _count = Counting::on();
        // SAFETY: fio's thread_data; timeout is NULL or a valid timespec.
        let (td, timeout) = unsafe { (td_ref(td), timeout.as_ref()) };
        let Some(t) = thread(td) else { return 0 };
        let deadline = timeout.map(|ts| {
            Instant::now()
                + Duration::new(
                    ts.tv_sec.max(0) as u64,
                    ts.tv_nsec.clamp(0, 999_999_999) as u32,
                )
        });
        let (min, max) = (min as usize, (max as usize).min(t.events.capacity()).max(1));
        t.events.clear();
        if t.lost {
            // fio waits for every io_u in flight (io_u_quiesce loops until none is):
            // they all end now, with EIO
            return t.fail_inflight(max) as c_int;
        }
        let mut spins = 0u32;
        loop {
            let Thread {
                backend,
                events,
                inflight,
                ..
            } = &mut *t;
            let room = max - events.len();
            let r = backend.poll(room, &mut |tag, errno| {
                let u = tag as *mut io_u;
                // SAFETY: the tag is the io_u queued with it, still owned by the engine.
                unsafe { (*u).error = errno };
                if errno != 0 {
                    // SAFETY: as above.
                    unsafe { (*u).resid = (*u).xfer_buflen };
                }
                // SAFETY: as above.
                if let Some(slot) = inflight.get_mut(unsafe { index_of(u) }) {
                    *slot = std::ptr::null_mut();
                }
                events.push(u);
            });
            if let Err(e) = r {
                if !t.reported {
                    t.reported = true;
                    say(&e);
                }
                // the queue is gone: what it completed is reported, and every io_u
                // still in flight ends with EIO
                return t.fail_inflight(max) as c_int;
            }
            if t.events.len() >= min.max(1) || t.events.len() >= max {
                break;
            }
            if min == 0 && t.events.is_empty() && spins > 0 {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            spins = spins.wrapping_add(1);
            // Nothing yet: on a small machine the target and the device emulation need the
            // CPU a spinning initiator would take.
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        t.events.len() as c_int
    })
}

pub(crate) unsafe extern "C" fn event(td: *mut thread_data, i: c_int) -> *mut io_u {
    guarded(std::ptr::null_mut(), || {
        let _count = Counting::on();
        // SAFETY: fio's thread_data.
        let td = unsafe { td_ref(td) };
        thread(td)
            .and_then(|t| t.events.get(i as usize).copied())
            .unwrap_or(std::ptr::null_mut())
    })
}

#[cfg(test)]
mod tests {
    use super::IoReq;
    use crate::sys::fio_ddir;

    fn req(offset: u64, len: usize) -> IoReq {
        IoReq {
            ddir: fio_ddir::DDIR_READ,
            offset,
            len,
            buf: std::ptr::null_mut(),
            tag: 0,
            index: 0,
        }
    }

    #[test]
    fn blocks_splits_whole_blocks_and_names_the_rest() {
        assert_eq!(req(8192, 4096).blocks(12), Ok((2, 1)));
        assert_eq!(req(1024, 1536).blocks(9), Ok((2, 3)));
        let e = req(4096, 1000).blocks(12).unwrap_err();
        assert!(
            e.contains("1000 bytes at offset 4096") && e.contains("4096-byte"),
            "{e}"
        );
        assert!(req(100, 4096).blocks(12).is_err());
    }
}
