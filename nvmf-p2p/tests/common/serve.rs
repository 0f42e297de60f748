//! A running `nvmf-p2p serve` and the host-side steps VM tests take against it (kernel
//! initiator connect, fio verify, our `perf`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{discover, env, sh, sh_ok};

/// The `nvmf-p2p` binary under test: cargo names it for this crate's tests; other crates'
/// VM tests that include this module (fio-plugin's vm_fio) use the workspace's debug build.
pub const BIN: &str = match option_env!("CARGO_BIN_EXE_nvmf-p2p") {
    Some(p) => p,
    None => concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/nvmf-p2p"),
};

/// A running `nvmf-p2p serve`; SIGTERM on drop, and the exit must be clean.
pub struct Serve {
    child: Option<Child>,
    log: PathBuf,
    sock: PathBuf,
    cfg: PathBuf,
}

impl Serve {
    pub fn start(name: &str, port: u16, subsystems: &str) -> Serve {
        Self::start_with(name, port, "", subsystems)
    }

    /// As [`Serve::start`], with `preamble` (top-level keys such as `nvme_interrupts =
    /// false`) ahead of the tables.
    pub fn start_with(name: &str, port: u16, preamble: &str, subsystems: &str) -> Serve {
        let scratch = PathBuf::from(env("NVMF_P2P_SCRATCH"));
        let sock = PathBuf::from(format!("/run/nvmf-p2p/{name}.sock"));
        let cfg = scratch.join(format!("{name}.toml"));
        let text = format!(
            "{preamble}\ncontrol_socket = \"{}\"\n\n[[listener]]\ntrtype = \"rdma\"\naddress = \"{}\"\nport = {port}\n\n{subsystems}",
            sock.display(),
            env("NVMF_P2P_ADDR")
        );
        std::fs::write(&cfg, text).unwrap();
        let log = scratch.join(format!("{name}.log"));
        let mut s = Serve {
            child: None,
            log,
            sock,
            cfg,
        };
        s.spawn(Some(port));
        s
    }

    /// Starts serve on the config written by [`Serve::start_with`] (the log is appended to)
    /// and waits until its control socket is up and (with `port`) discovery answers.
    fn spawn(&mut self, port: Option<u16>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["--log", "info", "serve", "--config"])
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nvmf-p2p serve");
        self.child = Some(child);
        let s = self;
        let t0 = Instant::now();
        while !s.sock.exists() {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("serve exited early ({st}):\n{}", s.log_text());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "serve did not come up:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // serve opens its control socket only once its listeners are bound: discovery
        // must answer right away.
        let Some(port) = port else { return };
        let d = discover(port);
        assert!(
            d.status.success(),
            "discovery did not answer once the control socket was up:\n{}\n{}",
            String::from_utf8_lossy(&d.stderr),
            s.log_text()
        );
    }

    /// SIGKILL: no drain, no Disconnect, the socket file is left behind (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// After [`Serve::kill9`]: the same config again, as a supervisor would restart it.
    /// No discovery check: the kernel's discovery controller would share the host ID of
    /// a kernel controller still reconnecting, which the kernel refuses (EINVAL).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running serve");
        let _ = std::fs::remove_file(&self.sock);
        self.spawn(None);
    }

    /// The exit status if serve has exited (it should not have).
    pub fn child_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The serve process id (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The control socket.
    pub fn sock(&self) -> &std::path::Path {
        &self.sock
    }

    /// utime + stime of the serve process so far, in seconds (0 once it has exited).
    pub fn cpu_seconds(&self) -> f64 {
        let Some(c) = &self.child else { return 0.0 };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // fields after ')' start at state (3rd field overall): utime is 14th, stime 15th.
        (ticks(11) + ticks(12)) / 100.0
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = sh_ok(
            BIN,
            &["stats", "--json", "--socket", self.sock.to_str().unwrap()],
        );
        serde_json::from_str(&out).expect("stats --json is JSON")
    }

    /// `nvmf-p2p ctl <what>` against this target; its output.
    pub fn ctl(&self, what: &str) -> String {
        sh_ok(BIN, &["ctl", "--socket", self.sock.to_str().unwrap(), what])
    }

    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        // SIGTERM: drain, disconnect, flush, exit 0
        sh_ok("kill", &["-TERM", &child.id().to_string()]);
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "serve exited with {st}:\n{}", self.log_text());
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "serve ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    /// Not stopped by the test (a failed check): SIGTERM, up to 20 s to drain, then kill.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = sh("kill", &["-TERM", &c.id().to_string()]);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn hostnqn() -> String {
    sh_ok("nvme", &["gen-hostnqn"]).trim().to_string()
}

pub fn connect(nqn: &str, port: u16, host: &str) -> Output {
    connect_with(nqn, port, host, &[])
}

/// `nvme connect` with `extra` options (`--ctrl-loss-tmo=60`, ...).
pub fn connect_with(nqn: &str, port: u16, host: &str, extra: &[&str]) -> Output {
    let port = port.to_string();
    let addr = env("NVMF_P2P_ADDR");
    let mut args = vec![
        "connect", "-t", "rdma", "-n", nqn, "-a", &addr, "-s", &port, "-q", host,
    ];
    args.extend_from_slice(extra);
    sh("nvme", &args)
}

pub fn disconnect(nqn: &str) {
    sh_ok("nvme", &["disconnect", "-n", nqn]);
}

/// fio randwrite over `size` with crc32c checksums, then its verify phase reads every
/// block back (random order) and checks it.
pub fn fio_verify(dev: &str, bs: &str, qd: u32, size: &str) {
    let args = [
        "--name=v".to_string(),
        format!("--filename={dev}"),
        "--rw=randwrite".into(),
        format!("--bs={bs}"),
        format!("--iodepth={qd}"),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        format!("--size={size}"),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--do_verify=1".into(),
    ];
    let out = Command::new("fio").args(&args).output().expect("run fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verify: bad"),
        "fio bs={bs} qd={qd} on {dev} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn subsystem(nqn: &str, backend: &str, hosts: Option<&str>) -> String {
    let access = match hosts {
        None => "allow_any_host = true".to_string(),
        Some(h) => format!("allow_any_host = false\nhosts = [\"{h}\"]"),
    };
    format!(
        "[[subsystem]]\nnqn = \"{nqn}\"\nserial = \"NVMFP2PTEST\"\n{access}\n[[subsystem.namespace]]\nbackend = \"{backend}\"\n\n"
    )
}

/// `perf --json` against `addr:port/nqn`; the run must complete I/O without errors.
pub fn perf(port: u16, nqn: &str, workload: &str) -> serde_json::Value {
    let port = port.to_string();
    let out = sh_ok(
        BIN,
        &[
            "perf",
            "--traddr",
            &env("NVMF_P2P_ADDR"),
            "--trsvcid",
            &port,
            "--subnqn",
            nqn,
            "-q",
            "16",
            "-o",
            "4k",
            "-w",
            workload,
            "-t",
            "2",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("perf --json is JSON");
    assert!(v["ios"].as_u64().unwrap_or(0) > 0, "perf did no I/O: {v}");
    assert_eq!(v["errors"].as_u64(), Some(0), "perf saw errors: {v}");
    v
}
