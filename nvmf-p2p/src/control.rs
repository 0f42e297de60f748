//! The control socket of `nvmf-p2p serve`: a Unix stream socket, one JSON request line in,
//! one JSON reply line out, then the connection closes. `nvmf-p2p stats` and
//! `nvmf-p2p ctl ...` are its clients.
//!
//! Requests: `{"cmd":"stats"}`, `{"cmd":"reset-device"}`, the reconfiguration requests of
//! [`Request`] (`{"cmd":"add-namespace","nqn":"...","backend":"ram:64MiB"}`, ...).
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! Only the user `serve` runs as (and root) may use it: the socket file is mode 0600 —
//! 0660 with the group of `control_socket_group` — and every connection's peer
//! credentials (SO_PEERCRED) are checked as well. A request is one line of at most
//! [`MAX_REQUEST`] bytes; anything else gets an error reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest request line the server reads (bytes, newline included).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Per-subsystem, per-controller and per-queue counters.
    Stats,
    /// Device-level reset (FLR) of the VFIO-backed controllers, then re-initialisation.
    ResetDevice,
    /// The running configuration as TOML that `serve --config` accepts.
    SaveConfig,
    /// A new subsystem (no namespace yet unless added).
    AddSubsystem {
        nqn: String,
        #[serde(default)]
        serial: Option<String>,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        allow_any_host: bool,
        #[serde(default)]
        hosts: Vec<String>,
    },
    /// Removes a subsystem; its hosts' controllers are torn down.
    RemoveSubsystem { nqn: String },
    /// Changes a subsystem's attributes (those given).
    SetSubsystem {
        nqn: String,
        #[serde(default)]
        serial: Option<String>,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        allow_any_host: Option<bool>,
    },
    /// A new namespace; `nsid` defaults to the lowest free one.
    AddNamespace {
        nqn: String,
        backend: String,
        #[serde(default)]
        nsid: Option<u32>,
    },
    /// Removes a namespace (its commands in the device drain first).
    RemoveNamespace { nqn: String, nsid: u32 },
    /// A new listener (RDMA address and port).
    AddListener {
        address: String,
        #[serde(default)]
        port: Option<u16>,
    },
    /// Removes a listener; connections made through it stay.
    RemoveListener {
        address: String,
        #[serde(default)]
        port: Option<u16>,
    },
    /// Allows a host (or, `direct`, lets it attach direct-mode queues).
    AddHost {
        nqn: String,
        host: String,
        #[serde(default)]
        direct: bool,
    },
    /// Disallows a host; its controllers (or, `direct`, its direct queues) are torn down.
    RemoveHost {
        nqn: String,
        host: String,
        #[serde(default)]
        direct: bool,
    },
}

/// What the server's owner does with a request: a JSON body, or an error message.
pub type Handler = Arc<dyn Fn(&Request) -> Result<Value, String> + Send + Sync>;

/// A running control socket server; the socket file is removed on drop.
pub struct Server {
    path: PathBuf,
    _thread: JoinHandle<()>,
}

impl Server {
    /// Bind `path` and serve requests on a background thread. A stale socket file (nobody
    /// listening) is replaced; a live one is an error.
    /// Members of `group` (name or number) may use it too (mode 0660 and that group);
    /// `None`: the owner only (0600).
    pub fn start(path: &Path, group: Option<&str>, handler: Handler) -> Result<Server, String> {
        let gid = group.map(resolve_group).transpose()?;
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "control socket {} is in use by another nvmf-p2p serve; stop it or set control_socket in the config",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    format!(
                        "cannot create the control socket directory {}: {e}",
                        dir.display()
                    )
                })?;
            }
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot bind the control socket {}: {e}", path.display()))?;
        restrict(path, gid).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })?;
        let access = Access {
            // SAFETY: geteuid takes no argument and cannot fail.
            uid: unsafe { libc::geteuid() },
            gid,
        };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if let Err(why) = access.check(&conn) {
                        tracing::warn!("control socket: refused a connection: {why}");
                        // Take the request first, so the client reads the refusal
                        // rather than a broken pipe on its write.
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                        let _ = read_request(&conn);
                        let reply = serde_json::json!({ "ok": false, "error": why });
                        let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
                        continue;
                    }
                    serve_one(conn, &handler);
                }
            })
            .map_err(|e| format!("cannot start the control thread: {e}"))?;
        Ok(Server {
            path: path.to_path_buf(),
            _thread: thread,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Who may use the socket besides root: its owner, and members of `gid`.
struct Access {
    uid: u32,
    gid: Option<u32>,
}

impl Access {
    fn check(&self, conn: &UnixStream) -> Result<(), String> {
        let cred = peer_cred(conn)?;
        self.allows(&cred, || supplementary_groups(cred.pid))
    }

    /// Whether the peer `cred` (with supplementary groups from `groups`) may use it.
    fn allows(&self, cred: &libc::ucred, groups: impl FnOnce() -> Vec<u32>) -> Result<(), String> {
        if cred.uid == 0 || cred.uid == self.uid {
            return Ok(());
        }
        if let Some(gid) = self.gid {
            if cred.gid == gid || groups().contains(&gid) {
                return Ok(());
            }
        }
        Err(format!(
            "uid {} may not use this control socket (only uid {}{})",
            cred.uid,
            self.uid,
            self.gid
                .map_or(String::new(), |g| format!(" and group {g}"))
        ))
    }
}

fn peer_cred(conn: &UnixStream) -> Result<libc::ucred, String> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the sizes passed; the fd is the
    // connection's, open for the call.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error()));
    }
    Ok(cred)
}

/// Supplementary groups of process `pid` (`Groups:` of /proc/PID/status); empty if gone.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// A group name or number → gid.
fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("control_socket_group: cannot read /etc/group: {e}"))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group))
                .then(|| f.nth(1).and_then(|g| g.parse().ok()))
                .flatten()
        })
        .ok_or_else(|| format!("control_socket_group: no group `{group}` in /etc/group"))
}

/// Mode 0600, or 0660 with group `gid`.
fn restrict(path: &Path, gid: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(|e| {
            format!(
                "control_socket_group: cannot give {} to group {g}: {e}",
                path.display()
            )
        })?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes.
fn read_request(conn: &UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(conn).take(MAX_REQUEST as u64 + 1);
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("bad request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("bad request: longer than {MAX_REQUEST} bytes"));
    }
    String::from_utf8(line).map_err(|_| "bad request: not UTF-8".to_string())
}

fn serve_one(conn: UnixStream, handler: &Handler) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let reply = match read_request(&conn).and_then(|line| {
        serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}"))
    }) {
        Ok(req) => {
            // A handler that panics (it should not) answers an error; the server lives.
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&req)))
                .unwrap_or_else(|_| Err("internal error (see the serve log)".into()));
            match done {
                Ok(Value::Object(mut body)) => {
                    body.insert("ok".into(), Value::Bool(true));
                    Value::Object(body)
                }
                Ok(other) => serde_json::json!({ "ok": true, "result": other }),
                Err(e) => serde_json::json!({ "ok": false, "error": e }),
            }
        }
        Err(e) => serde_json::json!({ "ok": false, "error": e }),
    };
    // One write: a client reading up to the newline gets the whole line at once.
    let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
}

/// Send one request to the server at `path` and return its reply body (`ok` removed).
pub fn request(path: &Path, req: &Request) -> Result<Value, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the control socket {} ({e}): is `nvmf-p2p serve` running? (--socket sets the path)",
            path.display()
        )
    })?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(conn, "{text}").map_err(|e| format!("control socket write: {e}"))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("control socket read: {e}"))?;
    let mut v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("malformed reply from the control socket: {e}"))?;
    let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
    if !ok {
        let msg = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(format!("the target refused: {msg}"));
    }
    if let Value::Object(m) = &mut v {
        m.remove("ok");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nvmf-p2p-ctl-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn request_reply_round_trip_and_errors() {
        let path = sock("rt");
        let handler: Handler = Arc::new(|req| match req {
            Request::Stats => Ok(serde_json::json!({ "queues": 3 })),
            Request::ResetDevice => Err("no VFIO backend".into()),
            _ => Err("not here".into()),
        });
        let server = Server::start(&path, None, handler.clone()).unwrap();
        let stats = request(&path, &Request::Stats).unwrap();
        assert_eq!(stats, serde_json::json!({ "queues": 3 }));
        let err = request(&path, &Request::ResetDevice).unwrap_err();
        assert!(err.contains("no VFIO backend"), "{err}");
        // a second server on a live socket is refused
        let second = Server::start(&path, None, handler);
        assert!(second.err().unwrap().contains("in use"));
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn malformed_request_gets_an_error_reply() {
        let path = sock("bad");
        let _server = Server::start(&path, None, Arc::new(|_| Ok(serde_json::json!({})))).unwrap();
        let mut conn = UnixStream::connect(&path).unwrap();
        writeln!(conn, "{{\"cmd\":\"explode\"}}").unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("bad request"));
    }

    fn raw(path: &Path, bytes: &[u8]) -> Value {
        let mut conn = UnixStream::connect(path).unwrap();
        let _ = conn.write_all(bytes);
        let _ = conn.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    #[test]
    fn socket_is_owner_only_and_bad_requests_get_error_replies() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = sock("perm");
        let _server = Server::start(&path, None, Arc::new(|_| Ok(serde_json::json!({})))).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // SAFETY: geteuid takes no argument and cannot fail.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
        // Too long: refused without reading it all, and the server goes on.
        let mut big = vec![b'x'; MAX_REQUEST + 10];
        big.push(b'\n');
        let v = raw(&path, &big);
        assert_eq!(v["ok"], false);
        assert!(
            v["error"].as_str().unwrap().contains("longer than 65536"),
            "{v}"
        );
        for bad in [
            &b"\xff\xfe\n"[..],
            b"{\"cmd\":\"add-namespace\"}\n",
            b"{\"cmd\":\"remove-namespace\",\"nqn\":\"n\",\"nsid\":1,\"x\":1}\n",
            b"{\"cmd\":\"remove-namespace\",\"nqn\":\"n\",\"nsid\":-1}\n",
            b"[1,2,3]\n",
            b"",
        ] {
            let v = raw(&path, bad);
            assert_eq!(v["ok"], false, "{bad:?}");
            assert!(
                v["error"].as_str().unwrap().starts_with("bad request"),
                "{v}"
            );
        }
        // A request just under the limit is read whole.
        let mut ok = format!("{{\"cmd\":\"stats\"}}{}", " ".repeat(MAX_REQUEST - 40));
        ok.push('\n');
        assert_eq!(raw(&path, ok.as_bytes())["ok"], true);
        assert!(request(&path, &Request::Stats).is_ok());
    }

    #[test]
    fn panicking_handler_answers_an_error() {
        let path = sock("panic");
        let _server = Server::start(&path, None, Arc::new(|_| panic!("boom"))).unwrap();
        let e = request(&path, &Request::Stats).unwrap_err();
        assert!(e.contains("internal error"), "{e}");
        assert!(request(&path, &Request::Stats).is_err(), "still serving");
    }

    #[test]
    fn group_socket_is_0660_with_that_group() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = sock("group");
        // SAFETY: getegid takes no argument and cannot fail.
        let gid = unsafe { libc::getegid() };
        let _server = Server::start(
            &path,
            Some(&gid.to_string()),
            Arc::new(|_| Ok(serde_json::json!({}))),
        )
        .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        let e = Server::start(
            &sock("nogroup"),
            Some("no-such-group-here"),
            Arc::new(|_| Ok(Value::Null)),
        )
        .err()
        .unwrap();
        assert!(
            e.contains("control_socket_group") && e.contains("no-such-group-here"),
            "{e}"
        );
    }

    #[test]
    fn peer_credentials_decide() {
        let cred = |uid, gid| libc::ucred { pid: 1, uid, gid };
        let owner = Access {
            uid: 1000,
            gid: None,
        };
        assert!(owner.allows(&cred(1000, 5), Vec::new).is_ok());
        assert!(owner.allows(&cred(0, 0), Vec::new).is_ok());
        let e = owner.allows(&cred(1001, 5), || vec![5]).unwrap_err();
        assert!(e.contains("uid 1001 may not use"), "{e}");
        let group = Access {
            uid: 1000,
            gid: Some(50),
        };
        assert!(group.allows(&cred(1001, 50), Vec::new).is_ok());
        assert!(group.allows(&cred(1001, 7), || vec![3, 50]).is_ok());
        assert!(group.allows(&cred(1001, 7), || vec![3]).is_err());
    }

    /// Another uid is refused over a real connection (needs root to become it).
    #[test]
    fn other_uid_is_refused() {
        // SAFETY: geteuid takes no argument and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("other_uid_is_refused: not root, cannot become another uid; checked by peer_credentials_decide only");
            return;
        }
        let dir = std::env::temp_dir().join(format!("nvmf-p2p-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let _server = Server::start(
            &path,
            None,
            Arc::new(|_| Ok(serde_json::json!({ "secret": 1 }))),
        )
        .unwrap();
        // Open the file and its directory to everyone: the peer-credential check is what
        // must refuse.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
        let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let p = path.as_os_str().as_encoded_bytes();
        assert!(p.len() < sa.sun_path.len());
        for (d, s) in sa.sun_path.iter_mut().zip(p) {
            *d = *s as libc::c_char;
        }
        const REQ: &[u8] = b"{\"cmd\":\"stats\"}\n";
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("/bin/true");
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls on its own stack (no allocation).
        unsafe {
            child.pre_exec(move || {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, (&sa as *const libc::sockaddr_un).cast(), len) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::send(fd, REQ.as_ptr().cast(), REQ.len(), libc::MSG_NOSIGNAL);
                let mut buf = [0u8; 512];
                loop {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n <= 0 {
                        break;
                    }
                    libc::write(1, buf.as_ptr().cast(), n as usize);
                }
                Ok(())
            });
        }
        let out = child.output().unwrap();
        // The owner still gets through.
        assert_eq!(request(&path, &Request::Stats).unwrap()["secret"], 1);
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("uid 65534 may not use"),
            "{v}"
        );
    }

    #[test]
    fn missing_server_says_what_to_do() {
        let err = request(&sock("none"), &Request::Stats).unwrap_err();
        assert!(err.contains("is `nvmf-p2p serve` running"), "{err}");
    }
}
