//! VM tests of `nvmf-p2p serve` with the real Linux initiator, nvme-cli and fio over
//! soft-RoCE. Run inside the testbed (scripts/test does): the NVMe is on vfio-pci,
//! `NVMF_P2P_ADDR` is the rxe address, `NVMF_P2P_SCRATCH` a writable directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::serve::{connect, disconnect, fio_verify, hostnqn, perf, subsystem, Serve, BIN};
use common::{blockdev_of, env, sh, sh_ok};

#[test]
fn kernel_initiator_nvme_cli_and_fio_on_every_backend() {
    let scratch = PathBuf::from(env("NVMF_P2P_SCRATCH"));
    let file = scratch.join("ns-file.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let bdf = env("NVMF_P2P_BDF");
    let subs = [
        ("nqn.2026-11.io.nvmf-p2p:vm-ram", "ram:32MiB".to_string()),
        (
            "nqn.2026-11.io.nvmf-p2p:vm-file",
            format!("file:{}", file.display()),
        ),
        ("nqn.2026-11.io.nvmf-p2p:vm-vfio", format!("vfio:{bdf}")),
    ];
    let cfg: String = subs.iter().map(|(n, b)| subsystem(n, b, None)).collect();
    let serve = Serve::start("backends", 4420, &cfg);
    let host = hostnqn();
    let addr = env("NVMF_P2P_ADDR");

    let disc = sh_ok(
        "nvme",
        &[
            "discover", "-t", "rdma", "-a", &addr, "-s", "4420", "-q", &host,
        ],
    );
    for (nqn, _) in &subs {
        assert!(disc.contains(nqn), "discovery log lacks {nqn}:\n{disc}");
    }

    for (nqn, backend) in &subs {
        let c = connect(nqn, 4420, &host);
        assert!(
            c.status.success(),
            "connect {nqn}: {}",
            String::from_utf8_lossy(&c.stderr)
        );
        let dev = blockdev_of(nqn);
        let idc = sh_ok("nvme", &["id-ctrl", &dev]);
        assert!(idc.contains("NVMFP2PTEST"), "id-ctrl serial:\n{idc}");
        assert!(idc.contains(nqn), "id-ctrl subnqn:\n{idc}");
        let idns = sh_ok("nvme", &["id-ns", &dev]);
        assert!(idns.contains("nsze"), "id-ns:\n{idns}");
        sh_ok("nvme", &["smart-log", &dev]);
        sh_ok("nvme", &["error-log", &dev]);
        // SMART passthrough: a vfio: namespace shows the emulated device's composite
        // temperature (QEMU's NVME_TEMPERATURE, 323 K), the others our nominal 300 K.
        let smart = sh_ok("nvme", &["smart-log", &dev, "-o", "json"]);
        let smart: serde_json::Value = serde_json::from_str(&smart).expect("smart-log json");
        let kelvin = if backend.starts_with("vfio:") {
            323
        } else {
            300
        };
        assert_eq!(
            smart["temperature"].as_u64(),
            Some(kelvin),
            "smart-log of {nqn}: {smart}"
        );
        let errors = sh_ok("nvme", &["error-log", &dev, "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&errors).expect("error-log json");
        let kato = sh_ok("nvme", &["get-feature", &dev, "-f", "0xf"]);
        assert!(
            kato.contains("Keep Alive Timer"),
            "get-feature 0xf:\n{kato}"
        );
        let subsys = sh_ok("nvme", &["list-subsys"]);
        assert!(subsys.contains(nqn), "list-subsys:\n{subsys}");
        spec_commands(&dev, &scratch);
        if backend.starts_with("vfio:") {
            // the whole (64 MiB) namespace, small and large blocks
            fio_verify(&dev, "4k", 32, "64M");
            fio_verify(&dev, "128k", 1, "64M");
        } else {
            fio_verify(&dev, "4k", 32, "4M");
        }
        disconnect(nqn);
    }
    let stats = serve.stats();
    assert_eq!(
        stats["subsystems"].as_array().map(|a| a.len()),
        Some(4),
        "{stats}"
    );
    serve.stop();
}

/// The log pages, features and commands of issue 15 through nvme-cli: Firmware Slot log,
/// Commands Supported and Effects log, Temperature Threshold with every Select value,
/// Compare (matching and not).
fn spec_commands(dev: &str, scratch: &Path) {
    let fw = sh_ok("nvme", &["fw-log", dev]);
    assert!(fw.contains("frs1"), "fw-log:\n{fw}");
    // `--csi 0`: without it nvme-cli 2.3 reads CAP.CSS from the PCI BAR, which a fabrics
    // controller has not, and silently prints nothing.
    let fx = sh_ok("nvme", &["effects-log", dev, "--csi=0"]);
    assert!(
        fx.contains("Get Log Page") && fx.contains("Compare"),
        "effects-log:\n{fx}"
    );
    for sel in ["0", "1", "2", "3"] {
        let t = sh_ok("nvme", &["get-feature", dev, "-f", "4", "-s", sel]);
        eprintln!("get-feature -f 4 -s {sel}: {}", t.trim());
        // "get-feature:0x04 (Temperature Threshold), Current value:0x00000157"
        let value = t
            .split("value:")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok());
        let want = if sel == "3" { 0b100 } else { 343 }; // changeable / WCTEMP in kelvin
        assert_eq!(value, Some(want), "get-feature -f 4 -s {sel}:\n{t}");
    }
    let name = dev.trim_start_matches("/dev/");
    let lbs: usize = std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    let same = scratch.join("compare-same.bin");
    let other = scratch.join("compare-other.bin");
    std::fs::write(&same, &data).unwrap();
    let mut d2 = data.clone();
    d2[100] ^= 0xff;
    std::fs::write(&other, &d2).unwrap();
    let c = (4096 / lbs - 1).to_string();
    let args = |f: &Path| {
        vec![
            dev.to_string(),
            "-s".into(),
            "0".into(),
            "-c".into(),
            c.clone(),
            "-z".into(),
            "4096".into(),
            "-d".into(),
            f.display().to_string(),
        ]
    };
    let run = |sub: &str, f: &Path| {
        let mut a = vec![sub.to_string()];
        a.extend(args(f));
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        sh("nvme", &a)
    };
    let w = run("write", &same);
    assert!(w.status.success(), "nvme write: {w:?}");
    let ok = run("compare", &same);
    assert!(ok.status.success(), "nvme compare (same data): {ok:?}");
    let bad = run("compare", &other);
    let err =
        String::from_utf8_lossy(&bad.stderr).to_string() + &String::from_utf8_lossy(&bad.stdout);
    eprintln!("nvme compare (different data): {}", err.trim());
    assert!(
        !bad.status.success() && err.to_uppercase().contains("COMPARE"),
        "nvme compare with different data must fail with Compare Failure: {bad:?}"
    );
}

/// RDMA CM connections that never send Connect are dropped after `connect_timeout_ms`
/// (a warning each in serve's log); a kernel host connected meanwhile keeps working.
#[test]
fn connections_that_never_send_connect_are_dropped() {
    let nqn = "nqn.2026-11.io.nvmf-p2p:vm-silent";
    let port = 4431;
    let serve = Serve::start_with(
        "silent",
        port,
        "connect_timeout_ms = 1500",
        &subsystem(nqn, "ram:16MiB", None),
    );
    let addr: std::net::IpAddr = env("NVMF_P2P_ADDR").parse().unwrap();
    let dst = std::net::SocketAddr::new(addr, port);
    let silent: Vec<_> = (0..4)
        .map(|_| {
            transport::nvmf_rdma::RdmaHost::connect(dst, 0, 32, 0, Duration::from_secs(5))
                .expect("RDMA CM connect")
        })
        .collect();
    let c = connect(nqn, port, &hostnqn());
    assert!(
        c.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    let dev = blockdev_of(nqn);
    std::thread::sleep(Duration::from_secs(3));
    let log = serve.log_text();
    assert_eq!(
        log.matches("no Connect within the connect timeout").count(),
        4,
        "serve log:\n{log}"
    );
    fio_verify(&dev, "4k", 8, "1M");
    disconnect(nqn);
    drop(silent);
    serve.stop();
}

#[test]
fn unknown_host_is_rejected_and_reconnect_works() {
    let allowed = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000a110";
    let nqn = "nqn.2026-11.io.nvmf-p2p:vm-acl";
    let serve = Serve::start("acl", 4421, &subsystem(nqn, "ram:16MiB", Some(allowed)));
    let stranger = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000bad00";
    let c = connect(nqn, 4421, stranger);
    assert!(!c.status.success(), "a host not on the list connected");
    for round in 0..2 {
        let c = connect(nqn, 4421, allowed);
        assert!(
            c.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&c.stderr)
        );
        let dev = blockdev_of(nqn);
        fio_verify(&dev, "4k", 8, "1M");
        disconnect(nqn);
    }
    serve.stop();
}

/// The kernel nvmet-rdma target, file-backed, configured through configfs.
struct KernelTarget {
    sub: PathBuf,
    port: PathBuf,
    nqn: String,
}

impl KernelTarget {
    fn start(nqn: &str, port: u16, file: &Path) -> KernelTarget {
        let cfs = Path::new("/sys/kernel/config/nvmet");
        let sub = cfs.join("subsystems").join(nqn);
        let ns = sub.join("namespaces/1");
        let p = cfs.join("ports").join(port.to_string());
        let w = |f: PathBuf, v: &str| {
            std::fs::write(&f, v).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        };
        std::fs::create_dir(&sub).expect("nvmet subsystem (is nvmet loaded?)");
        w(sub.join("attr_allow_any_host"), "1");
        std::fs::create_dir(&ns).unwrap();
        w(ns.join("device_path"), file.to_str().unwrap());
        w(ns.join("buffered_io"), "1");
        w(ns.join("enable"), "1");
        std::fs::create_dir(&p).unwrap();
        w(p.join("addr_trtype"), "rdma");
        w(p.join("addr_adrfam"), "ipv4");
        w(p.join("addr_traddr"), &env("NVMF_P2P_ADDR"));
        w(p.join("addr_trsvcid"), &port.to_string());
        std::os::unix::fs::symlink(&sub, p.join("subsystems").join(nqn)).unwrap();
        KernelTarget {
            sub,
            port: p,
            nqn: nqn.to_string(),
        }
    }
}

impl Drop for KernelTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.port.join("subsystems").join(&self.nqn));
        let _ = std::fs::remove_dir(&self.port);
        let _ = std::fs::write(self.sub.join("namespaces/1/enable"), "0");
        let _ = std::fs::remove_dir(self.sub.join("namespaces/1"));
        let _ = std::fs::remove_dir(&self.sub);
    }
}

#[test]
fn userspace_initiator_perf_against_ours_and_the_kernel_target() {
    let ours = "nqn.2026-11.io.nvmf-p2p:vm-perf";
    let serve = Serve::start("perf", 4422, &subsystem(ours, "ram:16MiB", None));
    let w = perf(4422, ours, "randwrite");
    let r = perf(4422, ours, "randread");
    eprintln!(
        "ours: randwrite {} IOPS, randread {} IOPS",
        w["iops"], r["iops"]
    );
    serve.stop();

    let file = PathBuf::from(env("NVMF_P2P_SCRATCH")).join("knvmet.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let knqn = "nqn.2026-11.io.nvmf-p2p:vm-perf-kernel";
    let _k = KernelTarget::start(knqn, 4423, &file);
    let r = perf(4423, knqn, "randread");
    eprintln!("kernel target: randread {} IOPS", r["iops"]);

    // bad input: nobody listening, unknown subsystem → one clear error, non-zero exit
    let out = sh(
        BIN,
        &[
            "perf",
            "--traddr",
            &env("NVMF_P2P_ADDR"),
            "--trsvcid",
            "4499",
            "--subnqn",
            ours,
            "-t",
            "1",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("nvmf-p2p: ") && err.lines().count() == 1,
        "{err}"
    );
    let out = sh(
        BIN,
        &[
            "perf",
            "--traddr",
            &env("NVMF_P2P_ADDR"),
            "--trsvcid",
            "4423",
            "--subnqn",
            "nqn.bogus",
            "-t",
            "1",
        ],
    );
    assert!(!out.status.success());
    // the refusal named, not raw status codes
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("subsystem nqn.bogus not found on this target"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn perf_child(port: u16, nqn: &str, secs: u32) -> Child {
    Command::new(BIN)
        .args([
            "perf",
            "--traddr",
            &env("NVMF_P2P_ADDR"),
            "--trsvcid",
            &port.to_string(),
            "--subnqn",
            nqn,
            "-q",
            "8",
            "-w",
            "randrw",
            "-t",
            &secs.to_string(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn perf")
}

#[test]
fn two_initiators_at_once_and_abrupt_exits_leave_the_other_running() {
    let nqn = "nqn.2026-11.io.nvmf-p2p:vm-two";
    let serve = Serve::start("two", 4424, &subsystem(nqn, "ram:32MiB", None));
    let host = hostnqn();
    let c = connect(nqn, 4424, &host);
    assert!(
        c.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    let dev = blockdev_of(nqn);

    // 1. our initiator SIGKILLed mid-I/O while the kernel initiator verifies data
    let mut killed = perf_child(4424, nqn, 30);
    std::thread::sleep(Duration::from_secs(3));
    killed.kill().unwrap();
    let _ = killed.wait();
    fio_verify(&dev, "4k", 8, "4M");

    // 2. the kernel initiator force-disconnected mid-I/O while ours runs
    let ours = perf_child(4424, nqn, 8);
    let fio = Command::new("fio")
        .args([
            "--name=cut",
            &format!("--filename={dev}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=8",
            "--ioengine=libaio",
            "--direct=1",
            "--time_based",
            "--runtime=30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_secs(3));
    disconnect(nqn);
    let mut fio = fio;
    let _ = fio.wait();
    let out = ours.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "perf beside the cut connection failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["ios"].as_u64().unwrap_or(0) > 0 && v["errors"] == 0,
        "{v}"
    );

    // 3. the target still serves new connections and shuts down cleanly
    perf(4424, nqn, "randread");
    serve.stop();
}

/// `ctl reset-device` under kernel-initiator fio verify load (crc32c, QD32 randwrite,
/// checked while writing): each reset holds the poll groups' I/O until the commands in
/// the device are done, resets, and lets them go on — fio sees no error, no bad block.
#[test]
fn reset_device_under_fio_verify_load_loses_nothing() {
    let bdf = env("NVMF_P2P_BDF");
    let nqn = "nqn.2026-11.io.nvmf-p2p:vm-reset";
    let port = 4427;
    let serve = Serve::start("reset", port, &subsystem(nqn, &format!("vfio:{bdf}"), None));
    let c = connect(nqn, port, &hostnqn());
    assert!(
        c.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    let dev = blockdev_of(nqn);
    let fio = Command::new("fio")
        .args([
            "--name=reset",
            &format!("--filename={dev}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--ioengine=libaio",
            "--direct=1",
            "--size=32M",
            "--time_based",
            "--runtime=16",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    let resets = 3;
    for i in 0..resets {
        std::thread::sleep(Duration::from_secs(3));
        let out = serve.ctl("reset-device");
        assert!(out.contains(&bdf), "reset {i}: {out}");
    }
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verify: bad") && text.contains("err= 0"),
        "fio across {resets} resets failed:\n{text}\n{}\n--- serve log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        serve.log_text()
    );
    let log = serve.log_text();
    assert_eq!(
        log.matches("poll groups hold their backend I/O").count(),
        resets,
        "every reset held the poll groups:\n{log}"
    );
    let stats = serve.stats();
    eprintln!("after {resets} resets: {}", stats["controllers"]);
    disconnect(nqn);
    serve.stop();
}

/// Namespace block devices (`nvmeXnY`) the kernel initiator has for subsystem `nqn`.
fn namespace_devs(nqn: &str) -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["/sys/class/nvme-subsystem", "/sys/class/nvme"] {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let sub = std::fs::read_to_string(e.path().join("subsysnqn")).unwrap_or_default();
            if sub.trim() != nqn {
                continue;
            }
            for n in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let name = n.file_name().to_string_lossy().into_owned();
                let is_ns = name.strip_prefix("nvme").is_some_and(|rest| {
                    rest.split_once('n').is_some_and(|(a, b)| {
                        !a.is_empty()
                            && a.bytes().all(|c| c.is_ascii_digit())
                            && !b.is_empty()
                            && b.bytes().all(|c| c.is_ascii_digit())
                    })
                });
                if is_ns && Path::new(&format!("/dev/{name}")).exists() && !out.contains(&name) {
                    out.push(name);
                }
            }
        }
    }
    out.sort();
    out
}

/// Polls `namespace_devs(nqn)` until it has `n` entries (no `nvme ns-rescan`: the
/// kernel must act on the Namespace Attribute Changed event alone).
fn wait_namespaces(nqn: &str, n: usize, serve: &Serve) -> Vec<String> {
    let t0 = std::time::Instant::now();
    loop {
        let devs = namespace_devs(nqn);
        if devs.len() == n {
            return devs;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{nqn}: {devs:?}, want {n} namespaces\n{}\n--- serve log ---\n{}",
            sh_ok("dmesg", &[])
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n"),
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `nvmf-p2p ctl` changes a running target: a namespace added appears at the connected
/// kernel initiator as a new block device and goes again when removed (the AEN path, no
/// rescan); a subsystem added shows in `nvme discover` and goes when removed;
/// `save-config` writes what `serve --config` accepts; a refusal names the field.
#[test]
fn ctl_changes_reach_the_kernel_initiator() {
    let nqn = "nqn.2026-11.io.nvmf-p2p:vm-ctl";
    let added = "nqn.2026-11.io.nvmf-p2p:vm-ctl-added";
    let port = 4436;
    let serve = Serve::start("ctl", port, &subsystem(nqn, "ram:16MiB", None));
    let sock = serve.sock().to_str().unwrap().to_string();
    let ctl = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["ctl", "--socket", &sock, "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&sh_ok(BIN, &all)).expect("ctl --json is JSON")
    };
    let host = hostnqn();
    let c = connect(nqn, port, &host);
    assert!(
        c.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    let first = wait_namespaces(nqn, 1, &serve);

    let reply = ctl(&["add-namespace", nqn, "ram:8MiB", "--nsid", "2"]);
    assert!(
        reply["changes"][0]
            .as_str()
            .unwrap()
            .contains("namespace 2"),
        "{reply}"
    );
    let devs = wait_namespaces(nqn, 2, &serve);
    let new_dev = devs.iter().find(|d| !first.contains(d)).unwrap().clone();
    let dev = format!("/dev/{new_dev}");
    let size = sh_ok("blockdev", &["--getsize64", &dev]);
    assert_eq!(size.trim(), (8u64 << 20).to_string(), "{dev}");
    fio_verify(&dev, "4k", 8, "1M");

    let reply = ctl(&["remove-namespace", nqn, "2"]);
    assert_eq!(reply["drained"], true, "{reply}");
    assert_eq!(wait_namespaces(nqn, 1, &serve), first);

    // One clear refusal per bad request, naming the field.
    let out = sh(
        BIN,
        &[
            "ctl",
            "--socket",
            &sock,
            "add-namespace",
            nqn,
            "ram:1MiB",
            "--nsid",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("field `nsid`"),
        "{err}"
    );
    let out = sh(
        BIN,
        &[
            "ctl",
            "--socket",
            &sock,
            "remove-subsystem",
            "nqn.2026-11.io.nvmf-p2p:none",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not found on this target"),
        "{err}"
    );

    // A subsystem added at run time is in the discovery log, with a new generation.
    ctl(&[
        "add-subsystem",
        added,
        "--allow-any-host",
        "--serial",
        "ADDED1",
    ]);
    ctl(&["add-namespace", added, "ram:4MiB"]);
    let disc = sh_ok(
        "nvme",
        &[
            "discover",
            "-t",
            "rdma",
            "-a",
            &env("NVMF_P2P_ADDR"),
            "-s",
            &port.to_string(),
            "-q",
            &host,
        ],
    );
    assert!(disc.contains(added), "discovery lacks {added}:\n{disc}");
    let c = connect(added, port, &host);
    assert!(
        c.status.success(),
        "connect {added}: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    assert_eq!(wait_namespaces(added, 1, &serve).len(), 1);

    // save-config: the running configuration, accepted by serve's parser.
    let saved = PathBuf::from(env("NVMF_P2P_SCRATCH")).join("ctl-saved.toml");
    sh_ok(
        BIN,
        &[
            "ctl",
            "--socket",
            &sock,
            "save-config",
            "--output",
            saved.to_str().unwrap(),
        ],
    );
    let cfg = transport::config::TargetConfig::load(&saved).expect("saved config parses");
    let subs: Vec<&str> = cfg.subsystems.iter().map(|s| s.nqn.as_str()).collect();
    assert_eq!(subs, [nqn, added]);
    assert_eq!(cfg.subsystems[0].namespaces.len(), 1);

    // Removing it tears its controller down and takes it out of the log.
    let reply = ctl(&["remove-subsystem", added]);
    assert!(
        reply["changes"][0].as_str().unwrap().contains("removed"),
        "{reply}"
    );
    let disc = sh_ok(
        "nvme",
        &[
            "discover",
            "-t",
            "rdma",
            "-a",
            &env("NVMF_P2P_ADDR"),
            "-s",
            &port.to_string(),
            "-q",
            &host,
        ],
    );
    assert!(
        !disc.contains(added),
        "discovery still lists {added}:\n{disc}"
    );
    let _ = sh("nvme", &["disconnect", "-n", added]);
    // The first subsystem's host was not disturbed.
    fio_verify(&format!("/dev/{}", first[0]), "4k", 8, "1M");
    disconnect(nqn);
    let log = serve.log_text();
    assert!(
        log.contains("nvmf-p2p: ctl: subsystem"),
        "changes are logged:\n{log}"
    );
    serve.stop();
}
