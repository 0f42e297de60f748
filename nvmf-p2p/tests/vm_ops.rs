//! VM test of operating `nvmf-p2p serve` (issue 17 items 4-6), one serve on the emulated
//! NVMe through VFIO: sd_notify `READY=1` only once the control socket answers and
//! `STOPPING=1` on SIGTERM; a second serve of the same configuration refused before it
//! opens anything (no "direct mode on"); `probe` of the held controller names serve's
//! pid; the configured `direct_port`; named Connect refusals in `perf`; the default host
//! NQN shared by `perf` and `direct`; cumulative totals in `stats` after the host
//! disconnected, in `--format prometheus` and on the `[metrics]` HTTP endpoint; `bind
//! --config` of an already bound controller exits 0.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nvmf-p2p");
const NQN: &str = "nqn.2026-11.io.nvmf-p2p:vm-ops";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-000000000001";
const PORT: u16 = 4440;
const DIRECT_PORT: u16 = 4441;
const METRICS: &str = "127.0.0.1:9466";

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: run inside scripts/testbed"))
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env("NVMF_P2P_SCRATCH")).join("vm-ops");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Unix sockets cannot live on the 9p scratch share: they go to the guest's /tmp.
fn socket_path(name: &str) -> PathBuf {
    let d = PathBuf::from("/tmp/nvmf-p2p-vm-ops");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn recv(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn http_get(path: &str) -> String {
    let mut c = std::net::TcpStream::connect(METRICS).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn operating_serve() {
    let bdf = env("NVMF_P2P_BDF");
    let addr = env("NVMF_P2P_ADDR");
    let control = socket_path("control.sock");
    let cfg = scratch("target.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\ndirect_port = {DIRECT_PORT}\n\n[metrics]\nlisten = \"{METRICS}\"\n\n\
             [[listener]]\naddress = \"{addr}\"\nport = {PORT}\n\n\
             [[subsystem]]\nnqn = \"{NQN}\"\nhosts = [\"{HOST}\"]\ndirect_hosts = [\"{HOST}\"]\n\
             [[subsystem.namespace]]\nbackend = \"vfio:{bdf}\"\n",
            control.display()
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();

    // bind --config of a controller already on vfio-pci: a no-op that succeeds
    let o = run(&["bind", "--config", cfg_s]);
    assert!(o.status.success(), "bind --config:\n{}", text(&o));
    assert!(
        text(&o).contains("already bound to vfio-pci"),
        "{}",
        text(&o)
    );

    let notify_path = socket_path("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = scratch("serve.log");
    let child = Command::new(BIN)
        .args(["serve", "--config", cfg_s, "--log", "info"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut serve = Serve { child, log };
    let pid = serve.child.id();

    // READY=1 once listening, and the control socket answers by then
    let ready = recv(&notify, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no sd_notify from serve:\n{}", serve.log_text()));
    assert!(ready.starts_with("READY=1"), "{ready}");
    let o = run(&["stats", "--socket", control.to_str().unwrap(), "--json"]);
    assert!(
        o.status.success(),
        "stats right after READY=1:\n{}",
        text(&o)
    );
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["direct"]["port"], DIRECT_PORT, "direct_port: {stats}");
    assert!(serve
        .log_text()
        .contains(&format!("direct mode on (direct port {DIRECT_PORT})")));

    // a second serve of the same file: refused before it opens or announces anything
    let o = run(&["serve", "--config", cfg_s]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("another nvmf-p2p serve is running"), "{t}");
    assert!(!t.contains("direct mode on"), "{t}");

    // probe of the controller serve holds names serve
    let o = run(&["probe", &bdf]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains(&format!("pid {pid}")) && t.contains("nvmf-p2p serve"),
        "{t}"
    );

    // named Connect refusals
    let perf = |extra: &[&str]| {
        let mut a = vec!["perf", "--traddr", &addr, "--trsvcid", "4440"];
        a.extend_from_slice(extra);
        run(&a)
    };
    let o = perf(&["--subnqn", "nqn.2026-11.io.nvmf-p2p:nope", "-t", "1"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("subsystem nqn.2026-11.io.nvmf-p2p:nope not found on this target"),
        "{}",
        text(&o)
    );
    let other = "nqn.2014-08.org.nvmexpress:uuid:6e766d66-7032-7000-8000-0000000000e9";
    let o = perf(&["--subnqn", NQN, "--hostnqn", other, "-t", "1"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("host {other} is not allowed by subsystem {NQN}")),
        "{}",
        text(&o)
    );

    // I/O with the default host NQN (perf's = direct's), then the host is gone
    let o = perf(&[
        "--subnqn", NQN, "-q", "4", "-o", "4k", "-w", "randread", "-t", "2",
    ]);
    assert!(o.status.success(), "perf:\n{}", text(&o));
    let o = run(&[
        "direct",
        "--traddr",
        &addr,
        "--trsvcid",
        "4440",
        "--subnqn",
        NQN,
        "--attach-only",
    ]);
    assert!(
        o.status.success(),
        "direct with the default host NQN:\n{}",
        text(&o)
    );
    let o = run(&["stats", "--socket", control.to_str().unwrap(), "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let reads = stats["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == NQN)
        .map(|s| s["totals"]["read_commands"].as_u64().unwrap())
        .unwrap();
    assert!(
        reads > 0,
        "subsystem totals lost with the controller: {stats}"
    );
    assert!(
        stats["process"]["cpu_us_per_io"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    let o = run(&[
        "stats",
        "--socket",
        control.to_str().unwrap(),
        "--format",
        "prometheus",
    ]);
    let prom = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = format!("nvmf_p2p_subsystem_read_commands_total{{subsystem=\"{NQN}\"}} {reads}");
    assert!(prom.contains(&line), "{line} not in:\n{prom}");
    let http = http_get("/metrics");
    assert!(
        http.starts_with("HTTP/1.1 200 OK")
            && http.contains("# TYPE nvmf_p2p_subsystem_read_commands_total counter"),
        "{http}"
    );
    assert!(http_get("/").starts_with("HTTP/1.1 404"));

    // SIGTERM: STOPPING=1, then a clean exit
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let stopping = recv(&notify, Duration::from_secs(60));
    assert_eq!(
        stopping.as_deref(),
        Some("STOPPING=1"),
        "{}",
        serve.log_text()
    );
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = serve.child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "serve did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st.success(), "serve exit {st}:\n{}", serve.log_text());
}
