//! Interrupts as eventfds: one [`EventFd`] per MSI-X vector (VFIO signals it from the
//! device's interrupt; the simulator signals it when it posts a CQE to a queue with
//! interrupts enabled). A waiter puts the fd into poll(2)/epoll next to its other fds.
//!
//! The arm/check rule: clear the eventfd ([`EventFd::clear`]) *before* the last look at
//! the completion queue; sleep only if that look found nothing. A completion posted after
//! the clear signals the fd again, so it is never slept through.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking eventfd (counter semantics).
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with counter 0, non-blocking, close-on-exec.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Add 1 to the counter (wakes pollers).
    pub fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our own fd.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if r < 0 {
            // EAGAIN only when the counter would overflow u64::MAX - 1: already signalled.
            tracing::trace!("eventfd write: {}", io::Error::last_os_error());
        }
    }

    /// Read and reset the counter; returns how many signals were pending (0 if none).
    pub fn clear(&self) -> u64 {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from our own fd.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
        if r == 8 {
            u64::from_ne_bytes(v)
        } else {
            0
        }
    }

    /// Wait until the counter is non-zero or `timeout` passes (it is not cleared).
    /// Returns whether it was signalled.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        wait_readable(&[self.as_raw_fd()], timeout).map(|n| n > 0)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// poll(2) for readability of up to 8 fds; returns how many are readable (0 on timeout
/// or EINTR).
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<usize> {
    let mut p = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 8];
    let n = fds.len().min(p.len());
    for (slot, &fd) in p.iter_mut().zip(&fds[..n]) {
        slot.fd = fd;
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `p` is a valid array of at least `n` pollfd structures that outlives the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), n as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn signal_clear_and_wait() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.clear(), 0);
        assert!(!e.wait(Duration::from_millis(1)).unwrap());
        e.signal();
        e.signal();
        assert!(e.wait(Duration::ZERO).unwrap());
        assert_eq!(e.clear(), 2);
        assert_eq!(e.clear(), 0);
        assert!(!e.wait(Duration::ZERO).unwrap());
    }

    #[test]
    fn a_signal_from_another_thread_wakes_a_waiter() {
        let e = std::sync::Arc::new(EventFd::new().unwrap());
        let e2 = e.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            e2.signal();
        });
        let start = Instant::now();
        assert!(e.wait(Duration::from_secs(5)).unwrap());
        assert!(start.elapsed() < Duration::from_secs(4));
        t.join().unwrap();
    }
}
