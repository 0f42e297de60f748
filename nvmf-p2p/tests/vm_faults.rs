//! The fault matrix (docs/reliability.md), run inside the testbed by scripts/test (feature
//! `vm-tests`): each fault is injected while crc32c-verifying writers run — the kernel
//! initiator with fio libaio, our fio engine in standard (`nvmf`) mode and in direct mode,
//! each on its own 16 MiB of the one namespace — and every writer must end either with
//! 0 errors or with a clean I/O error (fio exits non-zero with an errno or the engine's
//! sentence, in bounded time). A "verify: bad" block, a crash or a hang fails the test, and
//! the target must go on serving afterwards.
//!
//! Each case prints one `fault-matrix | fault | initiator | mode | outcome` line, also
//! appended to `$NVMF_P2P_SCRATCH/fault-matrix.txt`. `NVMF_P2P_LONG=1` (passed into the
//! testbed by scripts/testbed) lengthens the load phases.
#![cfg(feature = "vm-tests")]

mod common;

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::serve::{connect_with, fio_verify, Serve, BIN};
use common::{blockdev_of, env, sh, sh_ok};

const NQN: &str = "nqn.2026-12.io.nvmf-p2p:vm-faults";
const DIRECT_HOST: &str = "nqn.2026-12.io.nvmf-p2p:faults-direct-host";
const KERNEL_INIT: &str = "nqn.2026-12.io.nvmf-p2p:faults-kernel-init";
const SILENT_HOST: &str = "nqn.2026-12.io.nvmf-p2p:faults-silent-host";
/// The port of every case: the fio engine's direct mode finds the target on 4420.
const PORT: u16 = 4420;
/// Kernel initiator options that let it ride out a target restart or a link cut.
const RECONNECT: &[&str] = &["--ctrl-loss-tmo=60", "--reconnect-delay=1"];

fn long() -> bool {
    std::env::var("NVMF_P2P_LONG").is_ok_and(|v| v == "1")
}

/// Seconds of verified load around a fault: `short` in scripts/test, 4x with NVMF_P2P_LONG=1.
fn secs(short: u64) -> u64 {
    if long() {
        short * 4
    } else {
        short
    }
}

fn scratch() -> PathBuf {
    PathBuf::from(env("NVMF_P2P_SCRATCH"))
}

/// Appends `text` and a newline to `$NVMF_P2P_SCRATCH/name` (kept after the boot).
fn append(name: &str, text: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(scratch().join(name))
    {
        let _ = writeln!(f, "{text}");
    }
}

fn row(fault: &str, initiator: &str, mode: &str, outcome: &str) {
    let line = format!("fault-matrix | {fault} | {initiator} | {mode} | {outcome}");
    eprintln!("{line}");
    append("fault-matrix.txt", &line);
}

/// The fio engine cargo built beside this test binary (the workspace test build), else the
/// workspace's debug build.
fn engine() -> String {
    let exe = std::env::current_exe().expect("test executable path");
    let beside = exe.with_file_name("libnvmf_p2p_fio.so");
    let so = if beside.is_file() {
        beside
    } else {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/debug/libnvmf_p2p_fio.so"
        ))
    };
    assert!(
        so.is_file(),
        "the fio engine {} is missing: build the workspace (cargo test --workspace --features vm-tests --no-run)",
        so.display()
    );
    so.display().to_string()
}

fn subsystem(backend: &str) -> String {
    format!(
        "[[subsystem]]\nnqn = \"{NQN}\"\nserial = \"NVMFP2PFAULT\"\nallow_any_host = true\n\
         direct_hosts = [\"{DIRECT_HOST}\"]\n[[subsystem.namespace]]\nbackend = \"{backend}\"\n"
    )
}

/// Which initiator drives a writer, and where on the namespace it writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Kernel,
    Ours,
    Direct,
}

impl Who {
    fn initiator(self) -> &'static str {
        match self {
            Who::Kernel => "kernel + fio libaio",
            Who::Ours | Who::Direct => "our fio engine",
        }
    }

    fn mode(self) -> &'static str {
        match self {
            Who::Kernel | Who::Ours => "standard",
            Who::Direct => "direct",
        }
    }

    /// Disjoint 16 MiB ranges, so one writer's verify never sees another's blocks.
    fn offset(self) -> &'static str {
        match self {
            Who::Kernel => "0",
            Who::Ours => "16M",
            Who::Direct => "32M",
        }
    }

    fn io_args(self, dev: &str) -> Vec<String> {
        let addr = env("NVMF_P2P_ADDR");
        match self {
            Who::Kernel => vec![
                format!("--filename={dev}"),
                "--ioengine=libaio".into(),
                "--direct=1".into(),
            ],
            Who::Ours => vec![
                format!("--ioengine=external:{}", engine()),
                "--mode=nvmf".into(),
                format!("--traddr={addr}"),
                format!("--trsvcid={PORT}"),
                format!("--subnqn={NQN}"),
            ],
            Who::Direct => vec![
                format!("--ioengine=external:{}", engine()),
                "--mode=direct".into(),
                format!("--traddr={addr}"),
                format!("--subnqn={NQN}"),
                format!("--hostnqn={DIRECT_HOST}"),
                "--completions=pushed".into(),
            ],
        }
    }
}

/// A time-based crc32c-verifying random writer (every write read back and checked within
/// a backlog of 64), its output in scratch files.
struct Writer {
    who: Who,
    child: Child,
    out: PathBuf,
    started: Instant,
}

impl Writer {
    fn start(who: Who, dev: &str, secs: u64, tag: &str) -> Writer {
        Writer::start_with(who, dev, secs, tag, "4k", 16)
    }

    /// As [`Writer::start`], with block size `bs` and queue depth `qd`.
    fn start_with(who: Who, dev: &str, secs: u64, tag: &str, bs: &str, qd: u32) -> Writer {
        let out = scratch().join(format!("fio-{tag}-{who:?}.out"));
        let mut args = vec![
            format!("--name={tag}"),
            "--thread=1".into(),
            "--rw=randwrite".into(),
            format!("--bs={bs}"),
            format!("--iodepth={qd}"),
            format!("--offset={}", who.offset()),
            "--size=16M".into(),
            "--time_based=1".into(),
            format!("--runtime={secs}"),
            "--verify=crc32c".into(),
            "--verify_backlog=64".into(),
            "--verify_fatal=1".into(),
        ];
        args.extend(who.io_args(dev));
        let child = Command::new("fio")
            .args(&args)
            .stdout(File::create(&out).unwrap())
            .stderr(Stdio::from(
                File::create(out.with_extension("err")).unwrap(),
            ))
            .spawn()
            .expect("spawn fio");
        Writer {
            who,
            child,
            out,
            started: Instant::now(),
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        reap(&mut self.child);
    }

    /// Waits up to `limit` for fio's end and classifies it. Corruption, a crash or a hang
    /// panics; a clean I/O error is returned as `Err(first error line)`.
    fn finish(mut self, limit: Duration, what: &str) -> Result<String, String> {
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if self.started.elapsed() > limit {
                let mut diag = diagnose(&format!("{what}: {:?} fio hung", self.who));
                diag += &backtraces(self.child.id());
                let _ = self.child.kill();
                reap(&mut self.child);
                panic!(
                    "{what}: {:?} fio hung ({} s, killed)\n{}\n{diag}",
                    self.who,
                    limit.as_secs(),
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = self.text();
        assert!(
            !text.contains("verify: bad") && !text.contains("bad magic"),
            "{what}: {:?} read back corrupt data\n{text}",
            self.who
        );
        assert!(
            !text.contains("panicked") && !text.contains("Segmentation") && status.code().is_some(),
            "{what}: {:?} fio or the engine crashed ({status})\n{text}",
            self.who
        );
        let took = self.started.elapsed().as_secs();
        if status.success() && text.contains("err= 0") {
            return Ok(format!("0 errors, 0 bad blocks ({took} s)"));
        }
        assert!(!status.success(), "{what}: fio exit 0 but errors\n{text}");
        let line = text
            .lines()
            .find(|l| l.contains("nvmf-p2p fio engine:"))
            .or_else(|| text.lines().find(|l| l.contains("err=")))
            .unwrap_or("fio failed")
            .trim()
            .to_string();
        Err(format!("{line} (after {took} s)"))
    }

    fn text(&self) -> String {
        let a = std::fs::read_to_string(&self.out).unwrap_or_default();
        let b = std::fs::read_to_string(self.out.with_extension("err")).unwrap_or_default();
        format!("{a}\n{b}")
    }
}

/// Waits up to 10 s for a killed child; one stuck in the kernel (D state) is left behind
/// rather than hanging the test.
fn reap(c: &mut Child) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("pid {} did not exit 10 s after SIGKILL", c.id());
}

/// The guest's view when something hangs or fails: kernel log tail, fio/nvmf-p2p process
/// states, rxe ports and QPs; also appended to `$NVMF_P2P_SCRATCH/faults-diag.txt`.
fn diagnose(what: &str) -> String {
    let run = |cmd: &str| {
        let o = sh("bash", &["-c", cmd]);
        format!("$ {cmd}\n{}", String::from_utf8_lossy(&o.stdout))
    };
    let text = [
        format!("=== {what}"),
        run("dmesg | tail -n 40"),
        run("ps -eo pid,stat,wchan:32,etimes,args | grep -E 'fio|nvmf-p2p' | grep -v grep"),
        run("rdma link show; rdma resource show qp | wc -l"),
        run("nvme list-subsys 2>/dev/null | head -20"),
    ]
    .join("\n");
    append("faults-diag.txt", &text);
    text
}

/// Every thread's stack of a hung process (gdb, from the host's root the guest shares).
fn backtraces(pid: u32) -> String {
    let o = sh(
        "bash",
        &[
            "-c",
            &format!(
                "timeout 60 gdb -p {pid} -batch -ex 'thread apply all bt 12' 2>&1 | grep -E '^(#|Thread)' | head -120"
            ),
        ],
    );
    let text = format!(
        "=== stacks of {pid}\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    append("faults-diag.txt", &text);
    text
}

/// Controllers of `hostnqn` in serve's stats.
fn controllers_of(st: &serde_json::Value, hostnqn: &str) -> usize {
    st["controllers"].as_array().map_or(0, |cs| {
        cs.iter().filter(|c| c["hostnqn"] == hostnqn).count()
    })
}

/// RDMA connections in the guest now: RC QPs (`rdma resource show qp`) over two — each
/// connection over soft-RoCE loopback has its QP on both sides. (The QPs' `pid` field is
/// the creating thread, which for serve is its CM thread, not the process.)
fn rc_connections() -> usize {
    let o = sh("rdma", &["resource", "show", "qp"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.split_whitespace().any(|t| t == "RC"))
        .count()
        / 2
}

/// Waits (up to 30 s) until our fio engines' controllers are up, so a fault hits them
/// mid-I/O rather than mid-connect.
fn wait_engines(serve: &Serve) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let st = serve.stats();
        if controllers_of(&st, transport::nvmf_rdma::DEFAULT_HOSTNQN) >= 1
            && controllers_of(&st, DIRECT_HOST) >= 1
        {
            std::thread::sleep(Duration::from_secs(2));
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!(
        "our engines were not both connected after 30 s: {}",
        serve.stats()
    );
}

/// The kernel controller of `NQN`, disconnected on drop even when a check fails (a
/// leftover controller would refuse the next test's connect).
struct Kernel {
    dev: String,
}

impl Kernel {
    /// Connected with `extra` options (default: ride out restarts and link cuts).
    fn connect(host: &str, extra: &[&str]) -> Kernel {
        let opts = if extra.is_empty() { RECONNECT } else { extra };
        let mut c = connect_with(NQN, PORT, host, opts);
        if !c.status.success() {
            // Seen once (docs/reliability.md, open): the first connect after serve started
            // with data_buffers = 4 lost its admin controller before the I/O queue's
            // Connect. Recorded with the guest's state, then tried once more.
            let why = String::from_utf8_lossy(&c.stderr).into_owned();
            diagnose(&format!("nvme connect as {host} failed: {why}"));
            row(
                "(setup) nvme connect",
                "kernel",
                "standard",
                &format!("failed once, retried: {}", why.trim()),
            );
            let _ = sh("nvme", &["disconnect", "-n", NQN]);
            std::thread::sleep(Duration::from_secs(2));
            c = connect_with(NQN, PORT, host, opts);
        }
        assert!(
            c.status.success(),
            "nvme connect: {}",
            String::from_utf8_lossy(&c.stderr)
        );
        Kernel {
            dev: blockdev_of(NQN),
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = sh("nvme", &["disconnect", "-n", NQN]);
    }
}

fn dmesg() -> String {
    String::from_utf8_lossy(&sh("dmesg", &[]).stdout).into_owned()
}

/// One short crc32c write+verify of our fio engine (standard mode) on its range: the
/// target serves new sessions after the fault.
fn ours_verify_once(what: &str) {
    let w = Writer::start(Who::Ours, "", 2, "after");
    let r = w.finish(Duration::from_secs(60), what);
    assert!(
        r.is_ok(),
        "{what}: a new session after the fault failed: {r:?}"
    );
}

/// Target SIGKILLed under load and restarted 2 s later by the same config: the kernel
/// initiator reconnects within ctrl_loss_tmo and fio goes on with 0 errors; our engine
/// (no reconnect) ends with a clean I/O error; new sessions work.
#[test]
fn target_sigkill_and_restart() {
    let bdf = env("NVMF_P2P_BDF");
    let mut serve = Serve::start("faults-kill", PORT, &subsystem(&format!("vfio:{bdf}")));
    let host = "nqn.2026-12.io.nvmf-p2p:faults-kernel-kill";
    let k = Kernel::connect(host, &[]);
    let dev = k.dev.clone();
    let marks = dmesg().lines().count();
    let run = secs(10);
    let ws: Vec<Writer> = [Who::Kernel, Who::Ours, Who::Direct]
        .into_iter()
        .map(|w| Writer::start(w, &dev, run, "kill"))
        .collect();
    wait_engines(&serve);
    serve.kill9();
    std::thread::sleep(Duration::from_secs(2));
    serve.restart();
    let limit = Duration::from_secs(run + 90);
    for w in ws {
        let who = w.who;
        match (who, w.finish(limit, "target SIGKILL")) {
            (Who::Kernel, Ok(o)) => row(
                "target SIGKILL, restart after 2 s",
                who.initiator(),
                who.mode(),
                &format!("reconnected, resumed: {o}"),
            ),
            (Who::Kernel, Err(e)) => panic!(
                "the kernel initiator did not ride out the restart: {e}\n--- serve log ---\n{}",
                serve.log_text()
            ),
            (_, r) => row(
                "target SIGKILL, restart after 2 s",
                who.initiator(),
                who.mode(),
                &match r {
                    Ok(o) => o,
                    Err(e) => format!("clean I/O error, no reconnect: {e}"),
                },
            ),
        }
    }
    let since: Vec<String> = dmesg().lines().skip(marks).map(String::from).collect();
    assert!(
        since.iter().any(|l| l.contains("reconnected")),
        "the kernel did not log a reconnect:\n{}",
        since.join("\n")
    );
    // the restarted target: the kernel controller still verifies, new sessions work
    fio_verify(&dev, "4k", 8, "2M");
    ours_verify_once("after restart");
    drop(k);
    serve.stop();
}

/// Our initiators SIGKILLed mid-I/O (standard and direct, a second apart) while the kernel
/// initiator verifies beside them: it sees 0 errors, the killed hosts' controllers and
/// direct attachments go away, new sessions work.
#[test]
fn initiator_sigkill_mid_io() {
    let bdf = env("NVMF_P2P_BDF");
    let serve = Serve::start("faults-init", PORT, &subsystem(&format!("vfio:{bdf}")));
    let k = Kernel::connect(KERNEL_INIT, &[]);
    let dev = k.dev.clone();
    let run = secs(10);
    let kernel = Writer::start(Who::Kernel, &dev, run, "ikill");
    let ours = Writer::start(Who::Ours, "", run, "ikill");
    let direct = Writer::start(Who::Direct, "", run, "ikill");
    wait_engines(&serve);
    ours.kill();
    row(
        "initiator SIGKILL mid-I/O",
        Who::Ours.initiator(),
        "standard",
        "killed; target tore the controller down, others unaffected",
    );
    std::thread::sleep(Duration::from_secs(1));
    direct.kill();
    row(
        "initiator SIGKILL mid-I/O",
        Who::Direct.initiator(),
        "direct",
        "killed; target dropped the attachment, others unaffected",
    );
    let k = kernel.finish(Duration::from_secs(run + 60), "initiator SIGKILL");
    let k = k.unwrap_or_else(|e| panic!("the kernel initiator beside the killed ones: {e}"));
    row(
        "initiator SIGKILL mid-I/O (beside)",
        Who::Kernel.initiator(),
        "standard",
        &k,
    );
    // the killed hosts' controllers are reaped; the kernel's stays
    let t0 = Instant::now();
    loop {
        let st = serve.stats();
        let killed = controllers_of(&st, transport::nvmf_rdma::DEFAULT_HOSTNQN)
            + controllers_of(&st, DIRECT_HOST);
        if killed == 0 && controllers_of(&st, KERNEL_INIT) == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "killed hosts' controllers were not reaped: {st}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    ours_verify_once("after initiator SIGKILL");
    drop(k);
    serve.stop();
}

struct LinkDown;

impl LinkDown {
    fn cut() -> LinkDown {
        sh_ok("ip", &["link", "set", "veth0", "down"]);
        LinkDown
    }
}

impl Drop for LinkDown {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "set", "veth0", "up"]);
        // the rxe port must be ACTIVE again before anything else runs
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            let o = sh("rdma", &["link", "show"]);
            if String::from_utf8_lossy(&o.stdout).contains("state ACTIVE") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("rxe port not ACTIVE 20 s after the link came back");
    }
}

/// The soft-RoCE link down for 5 s under load: the kernel initiator reconnects and fio goes
/// on; our engine either rides it out (RC retries) or ends with a clean error; the target
/// serves new sessions once the link is back.
#[test]
fn link_down_and_up() {
    if !long() {
        eprintln!(
            "link_down_and_up skipped: it runs with NVMF_P2P_LONG=1 only — after the link comes \
             back the kernel initiator's reconnects sometimes fail for minutes \
             (docs/reliability.md, open), which would make scripts/test flaky"
        );
        return;
    }
    let bdf = env("NVMF_P2P_BDF");
    let serve = Serve::start("faults-link", PORT, &subsystem(&format!("vfio:{bdf}")));
    let k = Kernel::connect("nqn.2026-12.io.nvmf-p2p:faults-kernel-link", &[]);
    let dev = k.dev.clone();
    let run = secs(12);
    let ws: Vec<Writer> = [Who::Kernel, Who::Ours, Who::Direct]
        .into_iter()
        .map(|w| Writer::start(w, &dev, run, "link"))
        .collect();
    wait_engines(&serve);
    {
        let _down = LinkDown::cut();
        std::thread::sleep(Duration::from_secs(5));
    }
    diagnose("link back up");
    for w in ws {
        let who = w.who;
        let r = w.finish(Duration::from_secs(run + 120), "link down");
        if who == Who::Kernel {
            let o = r.unwrap_or_else(|e| {
                panic!(
                    "the kernel initiator did not ride out the link cut: {e}\n--- serve log ---\n{}",
                    serve.log_text()
                )
            });
            row("rxe link down 5 s", who.initiator(), who.mode(), &o);
        } else {
            let o = match r {
                Ok(o) => format!("rode it out: {o}"),
                Err(e) => format!("clean I/O error: {e}"),
            };
            row("rxe link down 5 s", who.initiator(), who.mode(), &o);
        }
    }
    fio_verify(&dev, "4k", 8, "2M");
    ours_verify_once("after the link cut");
    drop(k);
    assert!(serve_alive(serve), "serve died across the link cut");
}

fn serve_alive(mut serve: Serve) -> bool {
    let alive = serve.child_status().is_none();
    serve.stop();
    alive
}

/// Keep-alive expiry: a host (our initiator library) that connects with KATO 2 s and then
/// sends nothing loses its controller — logged, gone from stats, its next command fails
/// cleanly — while the kernel initiator with KATO 2 s, which sends Keep Alive, stays.
#[test]
fn keep_alive_expiry() {
    use transport::initiator::{cmd, execute};
    use transport::nvmf_rdma::{Session, SessionOptions};
    let serve = Serve::start("faults-kato", PORT, &subsystem("ram:16MiB"));
    let kato_host = "nqn.2026-12.io.nvmf-p2p:faults-kernel-kato";
    let k = Kernel::connect(kato_host, &["--keep-alive-tmo=2"]);
    let dev = k.dev.clone();
    let dst: SocketAddr = format!("{}:{PORT}", env("NVMF_P2P_ADDR")).parse().unwrap();
    let mut s = Session::connect(SessionOptions {
        dst,
        subnqn: NQN.into(),
        hostnqn: SILENT_HOST.into(),
        nsid: 1,
        io_queues: 1,
        kato_ms: 2000,
        timeout: Duration::from_secs(10),
    })
    .expect("session with KATO 2 s");
    let ctrls = |st: &serde_json::Value| st["controllers"].as_array().map_or(0, Vec::len);
    assert_eq!(ctrls(&serve.stats()), 2, "both controllers are up");
    std::thread::sleep(Duration::from_secs(6));
    let st = serve.stats();
    assert_eq!(
        ctrls(&st),
        1,
        "the silent host's controller outlived its KATO: {st}"
    );
    assert!(
        serve.log_text().contains("keep-alive timeout"),
        "no keep-alive timeout logged:\n{}",
        serve.log_text()
    );
    let (q, _) = s.admin();
    let t0 = Instant::now();
    let r = execute(q, cmd::keep_alive(), &[], Duration::from_secs(10));
    assert!(r.is_err(), "a command on the expired controller succeeded");
    row(
        "keep-alive expiry (KATO 2 s, host silent 6 s)",
        "our initiator (transport::nvmf_rdma::Session)",
        "standard",
        &format!(
            "controller torn down; next command failed in {} ms: {}",
            t0.elapsed().as_millis(),
            r.err().map(|e| e.to_string()).unwrap_or_default()
        ),
    );
    // the kernel host, which sends Keep Alive every KATO/2, kept its controller
    fio_verify(&dev, "4k", 8, "2M");
    row(
        "keep-alive expiry (KATO 2 s, host sending Keep Alive)",
        Who::Kernel.initiator(),
        "standard",
        "controller kept, fio verify 0 errors",
    );
    drop(k);
    serve.stop();
}

/// Data-buffer exhaustion and many connections: 4 data buffers per poll group, the kernel
/// initiator at QD32 with 64 KiB writes verifying, and 4 perf processes with 16 I/O queues
/// each (64 I/O connections + their admin queues) at once — I/O waits for buffers, never
/// fails.
#[test]
fn buffer_exhaustion_and_64_connections() {
    let bdf = env("NVMF_P2P_BDF");
    let serve = Serve::start_with(
        "faults-many",
        PORT,
        "data_buffers = 4\nmax_io_queues = 16",
        &subsystem(&format!("vfio:{bdf}")),
    );
    let k = Kernel::connect("nqn.2026-12.io.nvmf-p2p:faults-kernel-many", &[]);
    let dev = k.dev.clone();
    let run = secs(8);
    let kernel = Writer::start_with(Who::Kernel, &dev, run, "many", "64k", 32);
    let addr = env("NVMF_P2P_ADDR");
    let mut perfs: Vec<Child> = (0..4)
        .map(|i| {
            Command::new(BIN)
                .args([
                    "perf",
                    "--traddr",
                    &addr,
                    "--trsvcid",
                    &PORT.to_string(),
                    "--subnqn",
                    NQN,
                    "--hostnqn",
                    &format!("nqn.2026-12.io.nvmf-p2p:faults-perf-{i}"),
                    "-P",
                    "16",
                    "-q",
                    "64",
                    "-w",
                    "randread",
                    "-t",
                    &run.to_string(),
                    "--json",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn perf")
        })
        .collect();
    // while they run: the most QPs serve held at once (4 x (16 + 1) for perf, 3 for the
    // kernel), sampled every second until every perf is done
    let mut queues = 0;
    let t0 = Instant::now();
    while perfs
        .iter_mut()
        .any(|p| p.try_wait().ok().flatten().is_none())
        && t0.elapsed() < Duration::from_secs(run + 120)
    {
        queues = queues.max(rc_connections());
        std::thread::sleep(Duration::from_secs(1));
    }
    let st = serve.stats();
    let mut ios = 0;
    for (i, p) in perfs.into_iter().enumerate() {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "perf {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["errors"].as_u64(), Some(0), "perf {i}: {v}");
        ios += v["ios"].as_u64().unwrap_or(0);
    }
    let k = kernel
        .finish(Duration::from_secs(run + 90), "buffer exhaustion")
        .unwrap_or_else(|e| panic!("kernel fio under buffer exhaustion: {e}"));
    eprintln!("while loaded: {queues} RDMA connections at most; {st}");
    assert!(
        queues >= 64 + 4,
        "fewer than 64 I/O + 4 admin queues were connected at once ({queues} connections): {st}"
    );
    row(
        "data buffers exhausted (4 per poll group, QD32 x 64 KiB + 64 queues at QD64)",
        Who::Kernel.initiator(),
        "standard",
        &k,
    );
    row(
        "64 I/O connections at once (4 perf x 16 queues)",
        "our perf",
        "standard",
        &format!("{queues} RDMA connections at once, {ios} reads, 0 errors"),
    );
    drop(k);
    serve.stop();
}

/// `ctl reset-device` (FLR, re-initialisation) twice under our fio engine's verified writes
/// in standard mode: the target holds the I/O across each reset, fio sees 0 errors. (The
/// kernel initiator under reset is vm_target's reset test; direct mode is vm_direct's.)
#[test]
fn reset_device_under_our_initiator() {
    let bdf = env("NVMF_P2P_BDF");
    let serve = Serve::start("faults-reset", PORT, &subsystem(&format!("vfio:{bdf}")));
    let run = secs(10);
    let w = Writer::start(Who::Ours, "", run, "reset");
    for i in 0..2 {
        std::thread::sleep(Duration::from_secs(3));
        let out = serve.ctl("reset-device");
        assert!(out.contains(&bdf), "reset {i}: {out}");
    }
    let o = w
        .finish(Duration::from_secs(run + 60), "reset-device")
        .unwrap_or_else(|e| {
            panic!(
                "our engine across resets: {e}\n--- serve log ---\n{}",
                serve.log_text()
            )
        });
    row(
        "ctl reset-device (FLR) x2 under load",
        Who::Ours.initiator(),
        "standard",
        &o,
    );
    serve.stop();
}
