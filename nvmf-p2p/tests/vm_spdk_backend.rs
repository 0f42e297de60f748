//! VM tests of the `spdk:BDF[:nsid]` backend (feature `spdk`): `nvmf-p2p serve` with the
//! testbed's NVMe attached by SPDK's driver (SPDK built by scripts/setup; hugepages set up
//! by scripts/lib/testbed-guest.sh when the VM has --mem 3G), served to the kernel
//! initiator (fio crc32c verify) and our initiator, and the errors a user meets.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::serve::{connect, disconnect, fio_verify, perf, subsystem, Serve, BIN};
use common::{blockdev_of, env};

const PORT: u16 = 4450;
const NQN: &str = "nqn.2026-12.io.nvmf-p2p:spdk-backend";

fn require_hugepages() {
    let hp: u32 = std::env::var("NVMF_P2P_HUGEPAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        hp >= 64,
        "only {hp} hugepages in the guest: the spdk: backend needs the VM booted with --mem 3G (scripts/test does)"
    );
}

/// The serve log line of SPDK's attach.
fn attach_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("NVMe controller attached by SPDK"))
        .unwrap_or_else(|| panic!("no SPDK attach in the log:\n{log}"))
}

#[test]
fn spdk_namespace_serves_the_kernel_initiator_and_perf() {
    require_hugepages();
    let bdf = env("NVMF_P2P_BDF");
    let backend = format!("spdk:{bdf}");
    let mut serve = Serve::start("spdk-backend", PORT, &subsystem(NQN, &backend, None));
    let log = serve.log_text();
    // nvme_interrupts is on by default: SPDK's queue pairs raise MSI-X into eventfds
    assert!(
        attach_line(&log).contains("interrupts=true"),
        "SPDK attached without interrupts:\n{log}"
    );
    assert!(
        log.contains("raw admin Identify through SPDK matches SPDK's controller data"),
        "the raw admin path (Identify through spdk_nvme_ctrlr_cmd_admin_raw) did not match:\n{log}"
    );

    let stats = serve.stats();
    let ns = &stats["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == NQN)
        .expect("our subsystem in stats")["namespaces"][0];
    assert_eq!(ns["backend"], format!("spdk:{bdf}:1"), "{stats}");
    assert!(ns["blocks"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert_eq!(
        stats["spdk_controllers"],
        serde_json::json!([bdf]),
        "{stats}"
    );

    // the kernel initiator: 4 KiB at QD16 and 128 KiB (the target's largest transfer)
    let host = common::serve::hostnqn();
    let c = connect(NQN, PORT, &host);
    assert!(
        c.status.success(),
        "nvme connect failed: {}\n{}",
        String::from_utf8_lossy(&c.stderr),
        serve.log_text()
    );
    let dev = blockdev_of(NQN);
    // SMART / Health passed through from the device by SPDK's admin queue (admin_raw):
    // the emulated NVMe's composite temperature, 323 K (ours without a device: 300 K).
    let smart = common::sh_ok("nvme", &["smart-log", &dev, "-o", "json"]);
    let smart: serde_json::Value = serde_json::from_str(&smart).expect("smart-log json");
    assert_eq!(smart["temperature"].as_u64(), Some(323), "{smart}");
    fio_verify(&dev, "4k", 16, "8M");
    fio_verify(&dev, "128k", 4, "8M");
    disconnect(NQN);

    // our initiator
    perf(PORT, NQN, "randrw");

    // every poll group took the zero-copy path: its pool is SPDK memory
    let log = serve.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("zero-copy asynchronous I/O") && l.contains("spdk:")),
        "the poll group did not put its buffer pool in SPDK DMA memory:\n{log}"
    );
    assert!(serve.child_status().is_none(), "serve died:\n{log}");
    serve.stop();
}

#[test]
fn spdk_namespace_with_polled_queues() {
    require_hugepages();
    let bdf = env("NVMF_P2P_BDF");
    let backend = format!("spdk:{bdf}");
    let serve = Serve::start_with(
        "spdk-polled",
        PORT,
        "nvme_interrupts = false",
        &subsystem(NQN, &backend, None),
    );
    let log = serve.log_text();
    assert!(
        attach_line(&log).contains("interrupts=false"),
        "nvme_interrupts = false did not reach SPDK:\n{log}"
    );
    let host = common::serve::hostnqn();
    let c = connect(NQN, PORT, &host);
    assert!(
        c.status.success(),
        "nvme connect failed:\n{}",
        serve.log_text()
    );
    let dev = blockdev_of(NQN);
    fio_verify(&dev, "4k", 8, "4M");
    disconnect(NQN);
    serve.stop();
}

/// Runs `serve` on a configuration that must be refused; returns its stderr.
fn serve_refuses(name: &str, subsystems: &str) -> String {
    let scratch = PathBuf::from(env("NVMF_P2P_SCRATCH"));
    let cfg = scratch.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"/run/nvmf-p2p/{name}.sock\"\n\n[[listener]]\ntrtype = \"rdma\"\naddress = \"{}\"\nport = {PORT}\n\n{subsystems}",
            env("NVMF_P2P_ADDR")
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let out = Command::new("timeout")
        .args(["60", BIN, "serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("run nvmf-p2p serve");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "serve did not give up"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "serve must refuse {name} with status 1:\n{err}"
    );
    err
}

#[test]
fn a_bdf_spdk_cannot_claim_is_a_clear_error_at_config_load() {
    require_hugepages();
    // no such device: serve's startup checks name the field and the device
    let err = serve_refuses("spdk-nodev", &subsystem(NQN, "spdk:0000:7f:1f.7", None));
    assert!(
        err.contains("subsystem[0].namespace[0].backend")
            && err.contains("no PCI device 0000:7f:1f.7"),
        "{err}"
    );
    // a device on no driver or another one than vfio-pci: the host bridge
    let err = serve_refuses("spdk-bridge", &subsystem(NQN, "spdk:0000:00:00.0", None));
    assert!(err.contains("run `nvmf-p2p bind 0000:00:00.0`"), "{err}");
    // one controller, two drivers
    let bdf = env("NVMF_P2P_BDF");
    let both = format!(
        "{}{}",
        subsystem(NQN, &format!("vfio:{bdf}"), None),
        subsystem(
            "nqn.2026-12.io.nvmf-p2p:spdk-other",
            &format!("spdk:{bdf}"),
            None
        )
    );
    let err = serve_refuses("spdk-both", &both);
    assert!(err.contains("already open with the other driver"), "{err}");
    // a namespace the controller does not have
    let err = serve_refuses("spdk-nons", &subsystem(NQN, &format!("spdk:{bdf}:9"), None));
    assert!(err.contains("no active namespace 9"), "{err}");
}

/// Direct mode on the controller SPDK's driver owns (`spdk:` namespace): a host not on
/// `direct_hosts` is refused; the doorbell page is exported as a dma-buf from SPDK's VFIO
/// device (rxe then refuses the MR: `forwarded`, EOPNOTSUPP); data written by direct mode
/// reads back through standard mode with the kernel initiator and with our initiator, and
/// what they write reads back through direct mode (pushed and polled completions, QD1 and
/// QD32); a device reset (SPDK's controller reset) under QD32 direct writes, with pushed
/// and with polled completions, loses no acknowledged block, and standard mode serves on
/// after it.
#[test]
fn direct_mode_on_an_spdk_namespace() {
    use common::direct::{dd_read, dd_write, expected, DirectTarget, OTHER_HOST};
    require_hugepages();
    let t = DirectTarget {
        port: 4452,
        nqn: "nqn.2026-12.io.nvmf-p2p:spdk-direct",
    };
    let bdf = env("NVMF_P2P_BDF");
    let mut serve = t.start_serve("spdk-direct", &format!("spdk:{bdf}"));
    attach_line(&serve.log_text());

    // 1. refused
    t.assert_refused(OTHER_HOST);

    // 2. the P2P attempt got as far as registering the exported doorbell page
    let a = t.run(&serve, &["--attach-only"]);
    eprintln!("attach on spdk: {a}");
    assert_eq!(a["level"], "forwarded", "{a}");
    let reason = a["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("EOPNOTSUPP"),
        "the doorbell dma-buf was not exported from SPDK's VFIO device (or refused otherwise): {a}\n{}",
        serve.log_text()
    );
    assert!(a["qid"].as_u64().unwrap_or(0) >= 1, "{a}");
    // the queue rings through SPDK's shadow doorbell pages: SPDK turned Doorbell Buffer
    // Config on (QEMU's NVMe offers it), and a tail written only to MMIO would be ignored
    let log = serve.log_text();
    let created = log
        .lines()
        .find(|l| l.contains("direct queue created on SPDK's controller"))
        .unwrap_or_else(|| panic!("no direct queue creation logged:\n{log}"));
    assert!(created.contains("shadow_doorbells=true"), "{created}");
    assert!(
        log.contains("the CMB is SPDK's"),
        "the SQ placement reason does not name SPDK's CMB:\n{log}"
    );
    let lba_size = a["lba_size"].as_u64().unwrap() as usize;

    // 3. direct writes (pushed at QD32, polled at QD1) → standard reads: kernel, ours
    let blocks = 1024u64;
    let nb = blocks.to_string();
    t.run(
        &serve,
        &["--fill", "61", "--lba", "0", "--blocks", &nb, "--qd", "32"],
    );
    t.run(
        &serve,
        &[
            "--completions",
            "polled",
            "--fill",
            "62",
            "--lba",
            "4096",
            "--blocks",
            &nb,
            "--qd",
            "1",
        ],
    );
    let c = connect(t.nqn, t.port, OTHER_HOST);
    assert!(
        c.status.success(),
        "nvme connect failed: {}\n{}",
        String::from_utf8_lossy(&c.stderr),
        serve.log_text()
    );
    let dev = blockdev_of(t.nqn);
    for (seed, lba) in [(61, 0), (62, 4096)] {
        assert!(
            dd_read(&dev, lba, blocks, lba_size) == expected(seed, lba, blocks, lba_size),
            "direct-written blocks at {lba} differ through the kernel initiator"
        );
        assert!(
            t.ours_io(lba, blocks, lba_size, None) == expected(seed, lba, blocks, lba_size),
            "direct-written blocks at {lba} differ through our initiator"
        );
    }

    // 4. standard writes (kernel, ours) → direct reads (pushed, polled)
    dd_write(&dev, 8192, &expected(63, 8192, blocks, lba_size), lba_size);
    t.ours_io(
        12288,
        blocks,
        lba_size,
        Some(&expected(64, 12288, blocks, lba_size)),
    );
    disconnect(t.nqn);
    t.run(
        &serve,
        &[
            "--check", "63", "--lba", "8192", "--blocks", &nb, "--qd", "32",
        ],
    );
    t.run(
        &serve,
        &[
            "--completions",
            "polled",
            "--check",
            "64",
            "--lba",
            "12288",
            "--blocks",
            &nb,
            "--qd",
            "32",
        ],
    );

    // 5. SPDK's controller reset under QD32 direct writes; then standard mode still
    //    serves, and sees every block the load wrote
    t.reset_under_load(&serve, "pushed", "65", "65536");
    let log = serve.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("controller reset by SPDK") && l.contains("rc=0")),
        "no SPDK controller reset logged:\n{log}"
    );
    assert!(
        t.ours_io(65536, 4096, lba_size, None) == expected(65, 65536, 4096, lba_size),
        "blocks written by direct mode across the reset differ through our initiator after it"
    );
    t.reset_under_load(&serve, "polled", "66", "65536");
    let st = serve.stats();
    eprintln!("direct on spdk: {}", st["direct"]);
    assert!(st["direct"]["refused"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert!(
        serve.child_status().is_none(),
        "serve died:\n{}",
        serve.log_text()
    );
    serve.stop();
}
