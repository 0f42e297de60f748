//! The control socket of `nvmf-p2p serve`: a Unix stream socket, one JSON request line in,
//! one JSON reply line out, then the connection closes. `nvmf-p2p stats` and
//! `nvmf-p2p ctl ...` are its clients.
//!
//! Requests: `{"cmd":"stats"}`, `{"cmd":"reset-device"}`. Replies: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Per-subsystem, per-controller and per-queue counters.
    Stats,
    /// Device-level reset (FLR) of the VFIO-backed controllers, then re-initialisation.
    ResetDevice,
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
    pub fn start(path: &Path, handler: Handler) -> Result<Server, String> {
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
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
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

fn serve_one(conn: UnixStream, handler: &Handler) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => match handler(&req) {
            Ok(Value::Object(mut body)) => {
                body.insert("ok".into(), Value::Bool(true));
                Value::Object(body)
            }
            Ok(other) => serde_json::json!({ "ok": true, "result": other }),
            Err(e) => serde_json::json!({ "ok": false, "error": e }),
        },
        Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
    };
    let mut conn = &conn;
    let _ = writeln!(conn, "{reply}");
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
        });
        let server = Server::start(&path, handler.clone()).unwrap();
        let stats = request(&path, &Request::Stats).unwrap();
        assert_eq!(stats, serde_json::json!({ "queues": 3 }));
        let err = request(&path, &Request::ResetDevice).unwrap_err();
        assert!(err.contains("no VFIO backend"), "{err}");
        // a second server on a live socket is refused
        let second = Server::start(&path, handler);
        assert!(second.err().unwrap().contains("in use"));
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn malformed_request_gets_an_error_reply() {
        let path = sock("bad");
        let _server = Server::start(&path, Arc::new(|_| Ok(serde_json::json!({})))).unwrap();
        let mut conn = UnixStream::connect(&path).unwrap();
        writeln!(conn, "{{\"cmd\":\"explode\"}}").unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("bad request"));
    }

    #[test]
    fn missing_server_says_what_to_do() {
        let err = request(&sock("none"), &Request::Stats).unwrap_err();
        assert!(err.contains("is `nvmf-p2p serve` running"), "{err}");
    }
}
