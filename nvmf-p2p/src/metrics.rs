//! Prometheus text exposition (format 0.0.4) of the `stats` reply, for
//! `nvmf-p2p stats --format prometheus` and the optional `[metrics] listen` HTTP endpoint
//! of `serve` (`GET /metrics`). The counters are the ones `stats --json` shows; this
//! module only renames and labels them, so both outputs cannot disagree.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// The content type of format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family: samples grouped under one HELP/TYPE header.
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

#[derive(Default)]
struct Families(BTreeMap<String, Family>);

impl Families {
    fn add(
        &mut self,
        name: &str,
        kind: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: f64,
    ) {
        self.0
            .entry(format!("nvmf_p2p_{name}"))
            .or_insert_with(|| Family {
                help,
                kind,
                samples: Vec::new(),
            })
            .samples
            .push((labels, value));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.0 {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (labels, v) in &f.samples {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, val)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape(val));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {v}");
            }
        }
        out
    }
}

/// Label value escaping of the text format: backslash, double quote, line feed.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Counters of a controller (live) or of a subsystem / namespace (cumulative): field of
/// the stats reply, metric name, help.
const IO_COUNTERS: &[(&str, &str, &str)] = &[
    ("read_commands", "read_commands_total", "Read commands completed."),
    ("write_commands", "write_commands_total", "Write commands completed."),
    ("bytes_read", "read_bytes_total", "Bytes read by hosts."),
    ("bytes_written", "written_bytes_total", "Bytes written by hosts."),
    (
        "errors",
        "errors_total",
        "Commands completed with a non-success NVMe status (including those aborted by a device reset, which hosts retry).",
    ),
];

/// Counters of the direct-mode service and its queues.
const DIRECT_SERVICE: &[(&str, &str, &str, &str)] = &[
    (
        "refused",
        "direct_attach_refused_total",
        "counter",
        "Direct attaches refused (host not on direct_hosts).",
    ),
    (
        "attached",
        "direct_attached_total",
        "counter",
        "Direct queues attached.",
    ),
    (
        "polls",
        "direct_poller_polls_total",
        "counter",
        "Iterations of the direct poller.",
    ),
    (
        "sleeps",
        "direct_poller_sleeps_total",
        "counter",
        "Times the direct poller slept on its channels.",
    ),
    (
        "device_sleeps",
        "direct_poller_device_sleeps_total",
        "counter",
        "Direct poller sleeps on NVMe interrupts while commands were in the device.",
    ),
];

const DIRECT_QUEUE: &[(&str, &str, &str, &str)] = &[
    (
        "doorbells_forwarded",
        "direct_doorbells_forwarded_total",
        "counter",
        "SQ tail doorbells the target forwarded to MMIO (forwarded level).",
    ),
    (
        "cq_heads_forwarded",
        "direct_cq_heads_forwarded_total",
        "counter",
        "CQ head doorbells forwarded to MMIO (polled completions).",
    ),
    (
        "cqes_pushed",
        "direct_cqes_pushed_total",
        "counter",
        "Completion entries pushed to the host.",
    ),
    (
        "reads_pushed",
        "direct_reads_pushed_total",
        "counter",
        "Read data pushed to the host by RDMA WRITE.",
    ),
    (
        "connected",
        "direct_queue_connected",
        "gauge",
        "1 while the host's direct connection is up.",
    ),
    (
        "depth",
        "direct_queue_depth",
        "gauge",
        "Entries of the direct queue.",
    ),
];

/// The `stats` reply as Prometheus text. Unknown or missing fields are left out, so a
/// reply of an older or newer `serve` still renders.
pub fn render(stats: &Value) -> String {
    let mut f = Families::default();
    if let Some(subs) = stats.get("subsystems").and_then(Value::as_array) {
        for s in subs {
            let sub = text(s, "nqn");
            let namespaces = s.get("namespaces").and_then(Value::as_array);
            f.add(
                "subsystem_namespaces",
                "gauge",
                "Namespaces of the subsystem.",
                vec![("subsystem", sub.clone())],
                namespaces.map_or(0, Vec::len) as f64,
            );
            // cumulative totals (they outlive the controllers)
            if let Some(t) = s.get("totals") {
                for (field, name, help) in IO_COUNTERS {
                    if let Some(v) = t.get(*field).and_then(num) {
                        f.add(
                            &format!("subsystem_{name}"),
                            "counter",
                            help,
                            vec![("subsystem", sub.clone())],
                            v,
                        );
                    }
                }
            }
            for ns in namespaces.into_iter().flatten() {
                let labels = vec![
                    ("subsystem", sub.clone()),
                    ("namespace", text(ns, "nsid")),
                    ("backend", text(ns, "backend")),
                ];
                if let (Some(bs), Some(n)) = (
                    ns.get("block_size").and_then(num),
                    ns.get("blocks").and_then(num),
                ) {
                    f.add(
                        "namespace_size_bytes",
                        "gauge",
                        "Capacity of the namespace in bytes.",
                        labels.clone(),
                        bs * n,
                    );
                }
                if let Some(t) = ns.get("totals") {
                    for (field, name, help) in IO_COUNTERS {
                        if let Some(v) = t.get(*field).and_then(num) {
                            f.add(
                                &format!("namespace_{name}"),
                                "counter",
                                help,
                                labels.clone(),
                                v,
                            );
                        }
                    }
                }
            }
        }
    }
    if let Some(ctrls) = stats.get("controllers").and_then(Value::as_array) {
        for c in ctrls {
            let labels = vec![
                ("subsystem", text(c, "subnqn")),
                ("controller", text(c, "cntlid")),
                ("host", text(c, "hostnqn")),
            ];
            for (field, name, help) in IO_COUNTERS {
                if let Some(v) = c.get(*field).and_then(num) {
                    f.add(
                        &format!("controller_{name}"),
                        "counter",
                        help,
                        labels.clone(),
                        v,
                    );
                }
            }
            if let Some(v) = c.get("ready").and_then(num) {
                f.add(
                    "controller_ready",
                    "gauge",
                    "1 while the controller is enabled and ready (CSTS.RDY).",
                    labels,
                    v,
                );
            }
        }
    }
    for (field, name, help) in [
        (
            "cpu_seconds",
            "target_cpu_seconds_total",
            "CPU time (user + system) of the serve process.",
        ),
        (
            "ios",
            "target_ios_total",
            "Read and write commands completed since serve started.",
        ),
    ] {
        if let Some(v) = stats
            .get("process")
            .and_then(|p| p.get(field))
            .and_then(num)
        {
            f.add(name, "counter", help, vec![], v);
        }
    }
    if let Some(d) = stats.get("direct") {
        for (field, name, kind, help) in DIRECT_SERVICE {
            if let Some(v) = d.get(*field).and_then(num) {
                f.add(name, kind, help, vec![], v);
            }
        }
        for q in d
            .get("queues")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let labels = vec![
                ("subsystem", text(q, "subnqn")),
                ("host", text(q, "hostnqn")),
                ("queue", text(q, "qid")),
                ("level", text(q, "level")),
            ];
            for (field, name, kind, help) in DIRECT_QUEUE {
                if let Some(v) = q.get(*field).and_then(num) {
                    f.add(name, kind, help, labels.clone(), v);
                }
            }
        }
    }
    f.render()
}

/// Where the HTTP endpoint gets its text from (the same handler as the control socket's
/// `stats`).
pub type Source = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves `GET /metrics` on `addr` from a background thread (one connection at a time:
/// a scraper every few seconds). Returns the bound address (port 0 picks one).
pub fn start_http(addr: SocketAddr, source: Source) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| format!("metrics: cannot listen on {addr} ([metrics] listen): {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("metrics: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                answer(conn, &source);
            }
        })
        .map_err(|e| format!("metrics: cannot start the thread: {e}"))?;
    Ok(bound)
}

/// Longest request head read (request line and headers); longer ones get 431.
const MAX_HEAD: usize = 8192;

fn answer(conn: TcpStream, source: &Source) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let mut request_line = String::new();
    let mut head = 0usize;
    let mut complete = false;
    loop {
        let mut line = String::new();
        match (&mut reader)
            .take((MAX_HEAD - head) as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(n) => head += n,
        }
        if head > MAX_HEAD {
            break;
        }
        if request_line.is_empty() {
            request_line = line.clone();
        }
        if line == "\r\n" || line == "\n" {
            complete = true;
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if !complete {
        let status = if head > MAX_HEAD {
            "431 Request Header Fields Too Large"
        } else {
            "400 Bad Request"
        };
        (status, "text/plain", format!("{status}\n"))
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".to_owned(),
        )
    } else if path != "/metrics" && !path.starts_with("/metrics?") {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics\n".to_owned(),
        )
    } else {
        match source() {
            Ok(t) => ("200 OK", CONTENT_TYPE, t),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        }
    };
    let mut w = &conn;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" }
    );
    if method != "HEAD" {
        let _ = w.write_all(body.as_bytes());
    }
    // Read what the client still sends (bounded) before closing, so the close is not a
    // reset that could lose the answer.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut (&conn).take(64 << 10), &mut std::io::sink());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sample() -> Value {
        serde_json::json!({
            "subsystems": [{
                "nqn": "nqn.2026-11.io.example:disk0",
                "namespaces": [{"nsid": 1, "backend": "ram:1048576", "block_size": 512, "blocks": 2048,
                                "totals": {"read_commands": 7, "write_commands": 3, "bytes_read": 28672,
                                           "bytes_written": 12288, "errors": 1}}],
                "totals": {"read_commands": 7, "write_commands": 3, "bytes_read": 28672,
                           "bytes_written": 12288, "errors": 1}
            }],
            "controllers": [{"cntlid": 1, "subnqn": "nqn.2026-11.io.example:disk0",
                             "hostnqn": "nqn.2014-08.org.nvmexpress:uuid:a\"b\\c", "ready": true,
                             "read_commands": 5, "write_commands": 2, "bytes_read": 20480,
                             "bytes_written": 8192, "errors": 0}],
            "process": {"cpu_seconds": 1.5, "ios": 10},
            "direct": {"port": 4421, "refused": 2, "attached": 1, "sleeps": 9, "device_sleeps": 4,
                       "polls": 100, "queues": [{"token": 5, "hostnqn": "h", "subnqn": "s",
                       "level": "forwarded", "qid": 3, "depth": 32, "connected": true,
                       "doorbells_forwarded": 11, "cq_heads_forwarded": 0, "cqes_pushed": 40,
                       "reads_pushed": 20}]}
        })
    }

    /// A strict reader of the text format: every sample belongs to a family announced by
    /// HELP and TYPE before it, names and label names are valid, label values are
    /// quoted with escapes, values parse as floats, no family or series twice. Returns
    /// `name{labels}` → value.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let valid = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !n.starts_with(|c: char| c.is_ascii_digit())
        };
        let mut help = HashSet::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').expect("HELP text");
                assert!(valid(name) && !h.is_empty(), "{line}");
                assert!(help.insert(name.to_owned()), "HELP twice: {line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, t) = rest.split_once(' ').expect("TYPE");
                assert!(help.contains(name), "TYPE before HELP: {line}");
                assert!(["counter", "gauge"].contains(&t), "{line}");
                assert!(
                    types.insert(name.to_owned(), t.to_owned()).is_none(),
                    "{line}"
                );
                continue;
            }
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "stray line {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').expect("value");
            let name = series.split('{').next().unwrap();
            assert!(valid(name), "{line}");
            assert!(types.contains_key(name), "sample without TYPE: {line}");
            if types[name] == "counter" {
                assert!(name.ends_with("_total"), "counter name {name}");
            }
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .expect(line);
                // walk k="v" pairs honouring escapes
                let mut chars = inner.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert!(valid(&key), "label {key} in {line}");
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    loop {
                        match chars.next().expect("unterminated label value") {
                            '\\' => {
                                assert!(matches!(chars.next(), Some('\\' | '"' | 'n')), "{line}")
                            }
                            '"' => break,
                            '\n' => panic!("raw newline"),
                            _ => {}
                        }
                    }
                    match chars.next() {
                        Some(',') | None => {}
                        Some(c) => panic!("unexpected {c} in {line}"),
                    }
                }
            }
            let v: f64 = value.parse().expect(line);
            assert!(
                samples.insert(series.to_owned(), v).is_none(),
                "series twice: {line}"
            );
        }
        samples
    }

    #[test]
    fn renders_valid_exposition_with_labels() {
        let text = render(&sample());
        let m = parse(&text);
        let ctrl = "subsystem=\"nqn.2026-11.io.example:disk0\",controller=\"1\",host=\"nqn.2014-08.org.nvmexpress:uuid:a\\\"b\\\\c\"";
        assert_eq!(
            m[&format!("nvmf_p2p_controller_read_commands_total{{{ctrl}}}")],
            5.0
        );
        assert_eq!(
            m[&format!("nvmf_p2p_controller_written_bytes_total{{{ctrl}}}")],
            8192.0
        );
        assert_eq!(m[&format!("nvmf_p2p_controller_ready{{{ctrl}}}")], 1.0);
        let sub = "subsystem=\"nqn.2026-11.io.example:disk0\"";
        assert_eq!(
            m[&format!("nvmf_p2p_subsystem_read_commands_total{{{sub}}}")],
            7.0
        );
        assert_eq!(m[&format!("nvmf_p2p_subsystem_errors_total{{{sub}}}")], 1.0);
        let ns = format!("{sub},namespace=\"1\",backend=\"ram:1048576\"");
        assert_eq!(
            m[&format!("nvmf_p2p_namespace_size_bytes{{{ns}}}")],
            1048576.0
        );
        assert_eq!(
            m[&format!("nvmf_p2p_namespace_write_commands_total{{{ns}}}")],
            3.0
        );
        assert_eq!(m["nvmf_p2p_target_cpu_seconds_total"], 1.5);
        assert_eq!(m["nvmf_p2p_direct_attach_refused_total"], 2.0);
        let q = "subsystem=\"s\",host=\"h\",queue=\"3\",level=\"forwarded\"";
        assert_eq!(
            m[&format!("nvmf_p2p_direct_doorbells_forwarded_total{{{q}}}")],
            11.0
        );
        assert_eq!(m[&format!("nvmf_p2p_direct_queue_connected{{{q}}}")], 1.0);
        assert!(text.contains("# TYPE nvmf_p2p_controller_errors_total counter\n"));
    }

    #[test]
    fn empty_and_foreign_replies_render() {
        assert_eq!(render(&serde_json::json!({})), "");
        let m = parse(&render(
            &serde_json::json!({"controllers": [{"cntlid": 2, "unknown": 4}], "x": 1}),
        ));
        assert!(m.is_empty(), "{m:?}");
    }

    fn http(addr: SocketAddr, req: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn http_endpoint_serves_get_metrics_only() {
        let source: Source = Arc::new(|| Ok(render(&sample())));
        let addr = start_http("127.0.0.1:0".parse().unwrap(), source).unwrap();
        let ok = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.contains(CONTENT_TYPE), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(parse(body)["nvmf_p2p_direct_attached_total"], 1.0);
        assert!(http(addr, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let post = http(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET"),
            "{post}"
        );
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert!(http(addr, &huge).starts_with("HTTP/1.1 431"));
        assert!(http(addr, "GET /metrics HTTP/1.1\r\n").starts_with("HTTP/1.1 400"));
        let head_only = http(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");
    }

    #[test]
    fn http_source_error_is_503() {
        let addr = start_http(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| Err("stats failed".into())),
        )
        .unwrap();
        let r = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("stats failed\n"),
            "{r}"
        );
    }
}
