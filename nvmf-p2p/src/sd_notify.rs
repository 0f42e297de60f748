//! systemd's readiness protocol (sd_notify(3)): one datagram such as `READY=1` to the
//! Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//! `serve` sends `READY=1` once its listeners are bound and the control socket is open
//! (`Type=notify` in `packaging/nvmf-p2p.service`), `STOPPING=1` when it drains. Without
//! `$NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=value` lines) to `$NOTIFY_SOCKET`. Returns
/// `Ok(false)` when the variable is not set.
pub fn notify(state: &str) -> Result<bool, String> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    send_to(&path.to_string_lossy(), state).map(|()| true)
}

/// Sends `state` to the notification socket `socket` (a path or `@abstract`).
pub fn send_to(socket: &str, state: &str) -> Result<(), String> {
    let err = |e: std::io::Error| format!("sd_notify to {socket}: {e}");
    let sock = UnixDatagram::unbound().map_err(err)?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
    } else {
        sock.send_to(state.as_bytes(), socket).map_err(err)?;
    }
    Ok(())
}

/// [`notify`], with a failure logged instead of returned: readiness is best effort for
/// the target itself (systemd then times the start out and says so).
pub fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_socket() {
        let path =
            std::env::temp_dir().join(format!("nvmf-p2p-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let _ = std::fs::remove_file(&path);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("nvmf-p2p-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error_naming_it() {
        let e = send_to("/nonexistent/notify.sock", "READY=1").unwrap_err();
        assert!(e.contains("/nonexistent/notify.sock"), "{e}");
    }
}
