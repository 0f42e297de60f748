//! VM tests of the fio engine (run inside the testbed by scripts/test; feature `vm-tests`):
//! the real fio loading `libnvmf_p2p_fio.so`, against `nvmf-p2p serve` and the kernel
//! nvmet-rdma target over soft-RoCE, and on the emulated NVMe through VFIO. Data is
//! checked with fio's crc32c verification; failures must end fio non-zero with the
//! engine's sentence, not a crash.
#![cfg(feature = "vm-tests")]

use std::path::PathBuf;
use std::process::Command;

#[path = "../../nvmf-p2p/tests/common/mod.rs"]
mod common;
use common::env;
use common::serve::{subsystem, Serve};

/// The engine under test: the cdylib cargo built with this test binary, beside it in
/// target/debug/deps (with this test's features: the allocation-counting build). `cargo
/// build` copies a featureless one to target/debug; that one is not what was tested.
fn engine() -> String {
    let exe = std::env::current_exe().expect("test executable path");
    let so = exe.with_file_name("libnvmf_p2p_fio.so");
    assert!(
        so.is_file(),
        "{} is missing: build with cargo test --features vm-tests",
        so.display()
    );
    so.display().to_string()
}
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
const NQN: &str = "nqn.2026-11.io.nvmf-p2p:vm-fio";
const WHO: &str = "nvmf-p2p fio engine: ";

struct Run {
    ok: bool,
    json: serde_json::Value,
    stdout: String,
    stderr: String,
}

fn fio(args: &[String], envs: &[(&str, &str)]) -> Run {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .envs(envs.iter().copied())
        .env("NVMF_P2P_FIO_ENGINE", engine())
        .output()
        .expect("run fio");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // fio prints engine messages before the JSON document
    let json = stdout
        .find("\n{")
        .map(|i| &stdout[i + 1..])
        .or_else(|| stdout.starts_with('{').then_some(stdout.as_str()))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(serde_json::Value::Null);
    Run {
        ok: out.status.success(),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every job ended without error; returns (read bytes, write bytes) summed over jobs.
fn jobs_ok(r: &Run, what: &str) -> (u64, u64) {
    assert!(r.ok, "{what}: fio failed\n{}\n{}", r.stdout, r.stderr);
    let jobs = r.json["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no JSON jobs\n{}", r.stdout));
    let (mut rd, mut wr) = (0, 0);
    for j in jobs {
        assert_eq!(j["error"].as_u64(), Some(0), "{what}: job error\n{j}");
        rd += j["read"]["io_bytes"].as_u64().unwrap_or(0);
        wr += j["write"]["io_bytes"].as_u64().unwrap_or(0);
    }
    assert!(
        !r.stderr.contains("verify: bad"),
        "{what}: verify failed\n{}",
        r.stderr
    );
    // The library built for these tests counts heap allocations in its I/O callbacks.
    let counts: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("heap allocations in the I/O callbacks"))
        .collect();
    assert!(
        !counts.is_empty(),
        "{what}: no allocation count printed\n{}",
        r.stderr
    );
    for l in counts {
        // fio's own log lines can land inside ours (threads share stderr): read the
        // count just before the words, not the line's start.
        let before = l.split(" heap allocations").next().unwrap_or("");
        let count = before
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or("");
        assert!(count == "0", "{what}: the I/O path allocated: {l}");
    }
    (rd, wr)
}

/// crc32c-verified random writes by two threads (each its own queue and 8 MiB range),
/// then the same blocks verified again by a read-only pass, then time-based random reads
/// with batched submission.
fn write_verify_read(engine: &[String], what: &str) {
    let common = [
        "--name=vfy",
        "--thread=1",
        "--numjobs=2",
        "--bs=4k",
        "--size=8M",
        "--offset_increment=8M",
        "--iodepth=16",
        "--verify=crc32c",
    ];
    let mut a = args(&common);
    a.extend(engine.iter().cloned());
    let mut w = a.clone();
    w.extend(args(&["--rw=randwrite", "--do_verify=1"]));
    let (rd, wr) = jobs_ok(&fio(&w, &[]), &format!("{what} randwrite+verify"));
    assert_eq!(wr, 16 << 20, "{what}: two jobs write 8 MiB each");
    assert_eq!(rd, 16 << 20, "{what}: and read it all back to verify");
    let mut v = a.clone();
    v.extend(args(&["--rw=randwrite", "--verify_only=1"]));
    let (rd, _) = jobs_ok(&fio(&v, &[]), &format!("{what} verify_only"));
    assert_eq!(rd, 16 << 20, "{what}: verify_only reads every block");

    let mut r = args(&[
        "--name=rr",
        "--thread=1",
        "--numjobs=2",
        "--bs=4k",
        "--size=16M",
        "--rw=randread",
        "--iodepth=32",
        "--iodepth_batch_submit=8",
        "--iodepth_batch_complete_min=1",
        "--iodepth_batch_complete_max=16",
        "--time_based=1",
        "--ramp_time=1",
        "--runtime=2",
    ]);
    r.extend(engine.iter().cloned());
    let (rd, _) = jobs_ok(&fio(&r, &[]), &format!("{what} randread"));
    assert!(rd > 0, "{what}: randread moved no data");
}

fn nvmf_args(port: &str, nqn: &str) -> Vec<String> {
    vec![
        format!("--ioengine=external:{}", engine()),
        "--mode=nvmf".into(),
        format!("--traddr={}", env("NVMF_P2P_ADDR")),
        format!("--trsvcid={port}"),
        format!("--subnqn={nqn}"),
    ]
}

/// fio must exit non-zero with the engine's sentence containing `expect`.
fn refused(engine: &[String], expect: &str, what: &str) {
    let mut a = args(&[
        "--name=bad",
        "--thread=1",
        "--bs=4k",
        "--size=1M",
        "--rw=randread",
    ]);
    a.extend(engine.iter().cloned());
    let r = fio(&a, &[]);
    assert!(!r.ok, "{what}: fio succeeded\n{}", r.stdout);
    let line = r
        .stderr
        .lines()
        .chain(r.stdout.lines())
        .find(|l| l.contains(WHO))
        .unwrap_or_else(|| panic!("{what}: no engine sentence\n{}\n{}", r.stdout, r.stderr));
    assert!(line.contains(expect), "{what}: {line}");
    assert!(
        !r.stderr.contains("panic") && !r.stderr.contains("Segmentation"),
        "{what}: crashed\n{}",
        r.stderr
    );
    eprintln!("{what}: {line}");
}

#[test]
fn nvmf_mode_against_our_target() {
    let bdf = env("NVMF_P2P_BDF");
    let serve = Serve::start(
        "fio-nvmf",
        4420,
        &subsystem(NQN, &format!("vfio:{bdf}"), None),
    );
    write_verify_read(&nvmf_args("4420", NQN), "nvmf/ours");

    // the example job file, as a user runs it
    let addr = env("NVMF_P2P_ADDR");
    let ex = format!("{EXAMPLES}/nvmf-randread.fio");
    let r = fio(&[ex], &[("TRADDR", &addr), ("SUBNQN", NQN)]);
    let (rd, _) = jobs_ok(&r, "examples/nvmf-randread.fio");
    assert!(rd > 0);

    refused(
        &nvmf_args("4420", "nqn.2026-11.io.nvmf-p2p:no-such-subsystem"),
        "subsystem nqn.2026-11.io.nvmf-p2p:no-such-subsystem not found on this target",
        "wrong subnqn",
    );
    refused(
        &nvmf_args("4499", NQN),
        "cannot connect to",
        "unreachable target",
    );
    serve.stop();
}

#[test]
fn nvmf_mode_against_the_kernel_target() {
    let scratch = PathBuf::from(env("NVMF_P2P_SCRATCH"));
    let img = scratch.join("fio-knvmet.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let knqn = "nqn.2026-11.io.nvmf-p2p:fio-kernel";
    let sh = |cmd: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "modprobe -a configfs nvmet nvmet-rdma >/dev/null 2>&1; mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config; . {root}/scripts/lib/guest-lib.sh; {cmd}"
            ))
            .env("KNQN", knqn)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&format!("knvmet_start {}", img.display()));
    let r = std::panic::catch_unwind(|| write_verify_read(&nvmf_args("4420", knqn), "nvmf/kernel"));
    sh("knvmet_stop");
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

fn local_args(bdf: &str) -> Vec<String> {
    vec![
        format!("--ioengine=external:{}", engine()),
        "--mode=local".into(),
        format!("--bdf={bdf}"),
    ]
}

#[test]
fn local_mode_on_the_emulated_nvme() {
    let bdf = env("NVMF_P2P_BDF");
    write_verify_read(&local_args(&bdf), "local");

    let ex = format!("{EXAMPLES}/local-qd1.fio");
    let r = fio(&[ex], &[("BDF", &bdf)]);
    let (rd, _) = jobs_ok(&r, "examples/local-qd1.fio");
    assert!(rd > 0);
    // the PCI address as fio's filename (':' would split it into several files)
    let mut a = args(&[
        "--name=fname",
        "--thread=1",
        "--bs=4k",
        "--size=1M",
        "--rw=read",
    ]);
    a.push(format!("--ioengine=external:{}", engine()));
    a.push("--mode=local".into());
    a.push(format!("--filename={}", bdf.replace(':', ".")));
    let (rd, _) = jobs_ok(&fio(&a, &[]), "local via filename");
    assert_eq!(rd, 1 << 20);

    // a PCI device that is not on vfio-pci: the host bridge
    refused(
        &local_args("0000:00:00.0"),
        "nvmf-p2p bind 0000:00:00.0",
        "BDF not on vfio-pci",
    );
}

const DIRECT_HOST: &str = "nqn.2026-11.io.nvmf-p2p:fio-direct-host";

fn direct_args(hostnqn: &str, completions: &str) -> Vec<String> {
    vec![
        format!("--ioengine=external:{}", engine()),
        "--mode=direct".into(),
        format!("--traddr={}", env("NVMF_P2P_ADDR")),
        format!("--subnqn={NQN}"),
        format!("--hostnqn={hostnqn}"),
        format!("--completions={completions}"),
    ]
}

#[test]
fn direct_mode_against_our_target() {
    let bdf = env("NVMF_P2P_BDF");
    let sub = format!(
        "[[subsystem]]\nnqn = \"{NQN}\"\nallow_any_host = true\ndirect_hosts = [\"{DIRECT_HOST}\"]\n\
         [[subsystem.namespace]]\nbackend = \"vfio:{bdf}\"\n"
    );
    let serve = Serve::start("fio-direct", 4420, &sub);
    write_verify_read(&direct_args(DIRECT_HOST, "pushed"), "direct/pushed");
    write_verify_read(&direct_args(DIRECT_HOST, "polled"), "direct/polled");

    let addr = env("NVMF_P2P_ADDR");
    let ex = format!("{EXAMPLES}/direct-randwrite-verify.fio");
    let r = fio(
        &[ex],
        &[("TRADDR", &addr), ("SUBNQN", NQN), ("HOSTNQN", DIRECT_HOST)],
    );
    let (rd, wr) = jobs_ok(&r, "examples/direct-randwrite-verify.fio");
    assert_eq!(
        (rd, wr),
        (8 << 20, 8 << 20),
        "the example writes and verifies 8 MiB"
    );

    refused(
        &direct_args("nqn.2026-11.io.nvmf-p2p:not-a-direct-host", "pushed"),
        "host not on direct_hosts",
        "host not on direct_hosts",
    );
    serve.stop();
}
