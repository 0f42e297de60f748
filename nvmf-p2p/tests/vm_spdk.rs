//! VM tests of interoperability with SPDK v26.05 (built by scripts/setup into its cache
//! prefix, found through `NVMF_P2P_SPDK`): SPDK's initiators — `spdk_nvme_identify`,
//! `spdk_nvme_perf`, the `spdk_bdev` fio plugin and `nvme_fuzz` — against our target, and
//! our initiator against SPDK's `nvmf_tgt`. Also what the kernel initiator prints for our
//! Connect rejections (the wire encoding checked by a foreign decoder).
//!
//! SPDK's tools exit 0 in cases that did nothing (spdk_nvme_perf without a controller), so
//! every check reads their output, not only the status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::serve::{connect, disconnect, fio_verify, hostnqn, perf, subsystem, Serve, BIN};
use common::{blockdev_of, env, sh, sh_ok};

/// DPDK memory of each SPDK app in MiB (hugepages: see scripts/lib/testbed-guest.sh).
const SPDK_MEM_MB: &str = "256";

/// The SPDK install of scripts/setup.
struct Spdk {
    prefix: PathBuf,
}

impl Spdk {
    fn find() -> Spdk {
        let prefix = std::env::var("NVMF_P2P_SPDK").unwrap_or_default();
        assert!(
            !prefix.is_empty() && Path::new(&prefix).is_dir(),
            "SPDK is not installed (NVMF_P2P_SPDK='{prefix}'): run scripts/setup, which builds it"
        );
        let hp: u32 = env("NVMF_P2P_HUGEPAGES").parse().unwrap_or(0);
        assert!(
            hp >= 128,
            "only {hp} hugepages in the guest: SPDK apps need the VM booted with --mem 3G"
        );
        Spdk {
            prefix: PathBuf::from(prefix),
        }
    }

    /// An SPDK binary: apps in build/bin, test apps in their build folders.
    fn bin(&self, name: &str) -> PathBuf {
        let candidates = [
            self.prefix.join("build/bin").join(name),
            self.prefix.join("bin").join(name),
            self.prefix.join("test/app/fuzz").join(name).join(name),
        ];
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .unwrap_or_else(|| panic!("{name} not found in {:?}: rerun scripts/setup", candidates))
    }

    /// A fio plugin (`spdk_bdev`, `spdk_nvme`).
    fn fio_plugin(&self, name: &str) -> PathBuf {
        let p = self.prefix.join("build/fio").join(name);
        assert!(
            p.is_file(),
            "{} missing: scripts/setup builds SPDK's fio plugins",
            p.display()
        );
        p
    }

    /// Runs an SPDK tool under `timeout`, returning its output.
    fn run(&self, name: &str, args: &[&str], secs: u32) -> Output {
        Command::new("timeout")
            .arg("-k5")
            .arg(secs.to_string())
            .arg(self.bin(name))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
    }
}

/// Disconnects the kernel initiator from a subsystem on drop, also when a check failed:
/// a controller left behind keeps its host NQN bound to the host id, and the kernel then
/// refuses every other host NQN (EINVAL on /dev/nvme-fabrics) in the tests that follow.
struct Disconnect<'a>(&'a str);

impl Drop for Disconnect<'_> {
    fn drop(&mut self) {
        let _ = sh("nvme", &["disconnect", "-n", self.0]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn trid(port: u16, nqn: &str, extra: &str) -> String {
    format!(
        "trtype:RDMA adrfam:IPv4 traddr:{} trsvcid:{port} subnqn:{nqn}{extra}",
        env("NVMF_P2P_ADDR")
    )
}

/// IOPS of spdk_nvme_perf's `Total` line (None when it has none: nothing attached).
fn perf_total_iops(stdout: &str) -> Option<f64> {
    let line = stdout.lines().find(|l| l.starts_with("Total"))?;
    line.split_once(':')?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Kernel messages printed since `mark` lines.
fn dmesg_since(mark: usize) -> String {
    let all = sh_ok("dmesg", &[]);
    all.lines().skip(mark).collect::<Vec<_>>().join("\n")
}

fn dmesg_lines() -> usize {
    sh_ok("dmesg", &[]).lines().count()
}

fn spdk_nvme_perf(spdk: &Spdk, trid: &str, secs: u32) -> (f64, String) {
    let t = secs.to_string();
    let o = spdk.run(
        "spdk_nvme_perf",
        &[
            "-r",
            trid,
            "-q",
            "16",
            "-o",
            "4096",
            "-w",
            "randrw",
            "-M",
            "50",
            "-t",
            &t,
            "-s",
            SPDK_MEM_MB,
            "--iova-mode",
            "pa",
        ],
        secs + 90,
    );
    let out = text(&o);
    let iops = perf_total_iops(&String::from_utf8_lossy(&o.stdout));
    assert!(
        o.status.success() && iops.is_some_and(|v| v > 0.0),
        "spdk_nvme_perf -r '{trid}' did no I/O (no Total line with IOPS > 0):\n{out}"
    );
    (iops.unwrap(), out)
}

/// The kernel initiator decodes our Connect rejections into the messages the spec layout
/// gives (IPO in DW0 15:00, IATTR 23:16): a wrong subsystem NQN names the field, a host
/// not on the list is "not allowed".
#[test]
fn kernel_initiator_prints_our_connect_rejections_right() {
    let nqn = "nqn.2026-12.io.nvmf-p2p:vm-connect-errors";
    // fixed NQNs: `nvme gen-hostnqn` derives its UUID from the VM's DMI UUID, the same each call
    let allowed = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000a111";
    let serve = Serve::start(
        "connect-errors",
        4439,
        &subsystem(nqn, "ram:8MiB", Some(allowed)),
    );
    let mark = dmesg_lines();
    let wrong = "nqn.2026-12.io.nvmf-p2p:no-such-subsystem";
    let o = connect(wrong, 4439, allowed);
    assert!(!o.status.success(), "connect to a missing subsystem worked");
    let k = dmesg_since(mark);
    assert!(
        k.contains(&format!(
            "Connect Invalid Data Parameter, subsysnqn \"{wrong}\""
        )),
        "kernel did not name the subsystem NQN field:\n{k}"
    );
    let mark = dmesg_lines();
    let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000bad01";
    let o = connect(nqn, 4439, other);
    assert!(!o.status.success(), "a host not on the list connected");
    let k = dmesg_since(mark);
    assert!(
        k.contains("is not allowed") && k.contains(other),
        "kernel did not report the host as not allowed:\n{k}"
    );
    // the allowed host still gets in
    let o = connect(nqn, 4439, allowed);
    assert!(o.status.success(), "allowed host refused:\n{}", text(&o));
    let _guard = Disconnect(nqn);
    let dev = blockdev_of(nqn);
    fio_verify(&dev, "4k", 8, "2M");
    disconnect(nqn);
    // and serve's own log says who was refused and why, as plain text (no colour codes
    // in a redirected log)
    let log = serve.log_text();
    for want in [
        "Connect refused: no such subsystem",
        "Connect refused: host not allowed",
        wrong,
        other,
    ] {
        assert!(log.contains(want), "serve log lacks '{want}':\n{log}");
    }
    assert!(!log.contains('\x1b'), "serve log has ANSI escapes:\n{log}");
    serve.stop();
}

/// SPDK's initiators against our target on the emulated NVMe (`vfio:`): identify, perf
/// (with and without a host NQN: spdk_nvme_perf sends an empty one when `-r` has none),
/// the spdk_bdev fio plugin with crc32c verify, then nvme_fuzz for 30 s — after which the
/// target must still serve discovery and a kernel-initiator fio verify.
#[test]
fn spdk_initiators_and_nvme_fuzz_against_our_target() {
    let spdk = Spdk::find();
    let nqn = "nqn.2026-12.io.nvmf-p2p:vm-spdk";
    let port = 4440;
    let backend = format!("vfio:{}", env("NVMF_P2P_BDF"));
    // a second subsystem on a RAM namespace: SPDK's tools against each backend kind
    let ram_nqn = "nqn.2026-12.io.nvmf-p2p:vm-spdk-ram";
    let mut serve = Serve::start(
        "spdk-interop",
        port,
        &(subsystem(nqn, &backend, None) + &subsystem(ram_nqn, "ram:16MiB", None)),
    );

    // identify
    let o = spdk.run(
        "spdk_nvme_identify",
        &["-r", &trid(port, nqn, ""), "-s", SPDK_MEM_MB, "-v", "pa"],
        120,
    );
    let out = text(&o);
    assert!(o.status.success(), "spdk_nvme_identify failed:\n{out}");
    assert!(
        out.contains("NVMFP2PTEST") && out.contains("Namespace ID:1"),
        "spdk_nvme_identify did not show our serial and namespace 1:\n{out}"
    );

    // perf: randrw QD16 4 KiB, empty host NQN (the case that failed with SC 0x82) and a real one
    let (iops, _) = spdk_nvme_perf(&spdk, &trid(port, nqn, ""), 5);
    eprintln!("spdk_nvme_perf (no hostnqn) against ours: {iops:.0} IOPS");
    let h = hostnqn();
    let (iops, _) = spdk_nvme_perf(&spdk, &trid(port, nqn, &format!(" hostnqn:{h}")), 5);
    eprintln!("spdk_nvme_perf (hostnqn) against ours: {iops:.0} IOPS");
    let o = spdk.run(
        "spdk_nvme_identify",
        &[
            "-r",
            &trid(port, ram_nqn, ""),
            "-s",
            SPDK_MEM_MB,
            "-v",
            "pa",
        ],
        120,
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Namespace ID:1"),
        "spdk_nvme_identify on the ram: subsystem:\n{}",
        text(&o)
    );
    let (iops, _) = spdk_nvme_perf(&spdk, &trid(port, ram_nqn, ""), 3);
    eprintln!("spdk_nvme_perf against ours, ram: namespace: {iops:.0} IOPS");

    // the spdk_bdev fio plugin over NVMe-oF/RDMA, crc32c verify
    let scratch = PathBuf::from(env("NVMF_P2P_SCRATCH"));
    let conf = scratch.join("spdk-bdev-rdma.json");
    std::fs::write(
        &conf,
        format!(
            r#"{{"subsystems":[{{"subsystem":"bdev","config":[{{"method":"bdev_nvme_attach_controller","params":{{"name":"Nvme0","trtype":"RDMA","adrfam":"IPv4","traddr":"{}","trsvcid":"{port}","subnqn":"{nqn}"}}}}]}}]}}"#,
            env("NVMF_P2P_ADDR")
        ),
    )
    .unwrap();
    let plugin = spdk.fio_plugin("spdk_bdev");
    // LD_PRELOAD through env(1): only fio may load the plugin (it needs fio's symbols)
    let o = Command::new("timeout")
        .args(["-k5", "240", "env"])
        .arg(format!("LD_PRELOAD={}", plugin.display()))
        .arg("fio")
        .args([
            "--name=spdk-bdev-verify",
            "--ioengine=spdk_bdev",
            "--thread=1",
            "--filename=Nvme0n1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=4M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--output-format=json",
            &format!("--spdk_json_conf={}", conf.display()),
            &format!("--spdk_mem={SPDK_MEM_MB}"),
            "--env_context=--iova-mode=pa",
        ])
        .output()
        .expect("run fio");
    let out = text(&o);
    let json = String::from_utf8_lossy(&o.stdout);
    let v: Option<serde_json::Value> = json
        .find('{')
        .and_then(|i| serde_json::from_str(&json[i..]).ok());
    let job = v.as_ref().map(|v| &v["jobs"][0]);
    let written = job
        .and_then(|j| j["write"]["io_bytes"].as_u64())
        .unwrap_or(0);
    let read = job
        .and_then(|j| j["read"]["io_bytes"].as_u64())
        .unwrap_or(0);
    let err = job.and_then(|j| j["error"].as_i64()).unwrap_or(-1);
    assert!(
        o.status.success() && written >= 4 << 20 && read >= 4 << 20 && err == 0,
        "spdk_bdev fio plugin verify failed (written {written}, verified {read}, error {err}):\n{out}"
    );

    // nvme_fuzz: 30 s of random admin + I/O commands with a fixed seed (60 s in the long
    // fault matrix, NVMF_P2P_LONG=1: docs/reliability.md)
    let fuzz_secs = if std::env::var("NVMF_P2P_LONG").is_ok_and(|v| v == "1") {
        "60"
    } else {
        "30"
    };
    let o = spdk.run(
        "nvme_fuzz",
        &[
            "-m",
            "0x1",
            "-s",
            SPDK_MEM_MB,
            "--iova-mode",
            "pa",
            "-t",
            fuzz_secs,
            "-S",
            "20261201",
            "-F",
            &trid(port, nqn, ""),
            "-N",
            "-a",
        ],
        180,
    );
    let out = text(&o);
    let _ = std::fs::write(scratch.join("nvme_fuzz.log"), &out);
    let completed: u64 = out
        .lines()
        .filter_map(|l| l.split("Total commands completed:").nth(1))
        .filter_map(|n| {
            n.split_whitespace()
                .next()?
                .trim_end_matches(',')
                .parse::<u64>()
                .ok()
        })
        .sum();
    eprintln!(
        "nvme_fuzz: {completed} commands completed, status {}",
        o.status
    );
    assert!(completed > 0, "nvme_fuzz completed no command:\n{out}");
    if let Some(st) = serve.child_status() {
        panic!("serve died under nvme_fuzz ({st}):\n{}", serve.log_text());
    }
    // it lives: discovery, a kernel-initiator verify, SPDK perf once more
    let d = common::discover(port);
    assert!(
        d.status.success(),
        "discovery after nvme_fuzz failed:\n{}",
        text(&d)
    );
    let o = connect(nqn, port, &hostnqn());
    assert!(o.status.success(), "connect after nvme_fuzz:\n{}", text(&o));
    let _guard = Disconnect(nqn);
    let dev = blockdev_of(nqn);
    fio_verify(&dev, "4k", 16, "4M");
    disconnect(nqn);
    spdk_nvme_perf(&spdk, &trid(port, nqn, ""), 3);
    serve.stop();
}

/// SPDK's `nvmf_tgt` with its config given as JSON at start (no rpc.py round trips).
struct SpdkTarget {
    child: Child,
    log: PathBuf,
}

impl SpdkTarget {
    fn start(spdk: &Spdk, nqn: &str, port: u16) -> SpdkTarget {
        let scratch = PathBuf::from(env("NVMF_P2P_SCRATCH"));
        let conf = scratch.join("nvmf_tgt.json");
        let addr = env("NVMF_P2P_ADDR");
        std::fs::write(
            &conf,
            format!(
                r#"{{"subsystems":[
 {{"subsystem":"bdev","config":[{{"method":"bdev_malloc_create","params":{{"name":"Malloc0","num_blocks":32768,"block_size":512}}}}]}},
 {{"subsystem":"nvmf","config":[
  {{"method":"nvmf_create_transport","params":{{"trtype":"RDMA"}}}},
  {{"method":"nvmf_create_subsystem","params":{{"nqn":"{nqn}","allow_any_host":true,"serial_number":"SPDK00000000000001"}}}},
  {{"method":"nvmf_subsystem_add_ns","params":{{"nqn":"{nqn}","namespace":{{"bdev_name":"Malloc0"}}}}}},
  {{"method":"nvmf_subsystem_add_listener","params":{{"nqn":"{nqn}","listen_address":{{"trtype":"RDMA","adrfam":"IPv4","traddr":"{addr}","trsvcid":"{port}"}}}}}}
 ]}}]}}"#
            ),
        )
        .unwrap();
        let log = scratch.join("nvmf_tgt.log");
        let child = Command::new(spdk.bin("nvmf_tgt"))
            .args(["-m", "0x1", "-s", SPDK_MEM_MB, "--iova-mode", "pa"])
            .args(["-r", "/var/tmp/nvmf-p2p-spdk-tgt.sock", "--json"])
            .arg(&conf)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(scratch.join("nvmf_tgt.err")).unwrap(),
            ))
            .spawn()
            .expect("spawn nvmf_tgt");
        let mut t = SpdkTarget { child, log };
        let t0 = Instant::now();
        loop {
            if let Some(st) = t.child.try_wait().unwrap() {
                panic!("nvmf_tgt exited early ({st}):\n{}", t.log_text());
            }
            if common::discover(port).status.success() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "nvmf_tgt did not listen on port {port}:\n{}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        t
    }

    fn log_text(&self) -> String {
        let err = self.log.with_extension("err");
        format!(
            "{}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }
}

impl Drop for SpdkTarget {
    fn drop(&mut self) {
        let _ = sh("kill", &["-INT", &self.child.id().to_string()]);
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Our userspace initiator (`perf`) against SPDK's nvmf_tgt (Malloc bdev): reads and
/// writes complete without errors; a direct-mode attach, which SPDK does not offer, is
/// refused with a message, not a crash.
#[test]
fn our_initiator_against_spdk_nvmf_tgt() {
    let spdk = Spdk::find();
    let nqn = "nqn.2016-06.io.spdk:cnode1";
    let port = 4441;
    let tgt = SpdkTarget::start(&spdk, nqn, port);
    for w in ["randread", "randwrite"] {
        let v = perf(port, nqn, w);
        eprintln!("our perf {w} against nvmf_tgt: {}", v["iops"]);
    }
    let p = port.to_string();
    let o = sh(
        BIN,
        &[
            "perf",
            "--direct",
            "--traddr",
            &env("NVMF_P2P_ADDR"),
            "--trsvcid",
            &p,
            "--subnqn",
            nqn,
            "-q",
            "4",
            "-t",
            "1",
        ],
    );
    let out = text(&o);
    assert!(
        !o.status.success() && !out.contains("panicked"),
        "perf --direct against nvmf_tgt should fail cleanly:\n{out}"
    );
    assert!(
        o.stderr.len() > 10,
        "perf --direct gave no reason for its failure:\n{out}"
    );
    eprintln!(
        "perf --direct against nvmf_tgt refused: {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
    drop(tgt);
}
