//! Helpers shared by the VM integration tests (`tests/vm_*.rs`): environment of the
//! testbed, running commands, finding the kernel initiator's block device.
#![allow(dead_code)] // each test binary uses its own subset

pub mod direct;
pub mod serve;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A testbed variable (`NVMF_P2P_ADDR`, ...); panics outside the VM with a hint.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run inside scripts/testbed"))
}

/// Runs a command, returns its output.
pub fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh_ok(cmd: &str, args: &[&str]) -> String {
    let out = sh(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel initiator's block device for `nqn` (waits for it to appear).
pub fn blockdev_of(nqn: &str) -> String {
    let t0 = Instant::now();
    loop {
        for dir in ["/sys/class/nvme-subsystem", "/sys/class/nvme"] {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let sub = std::fs::read_to_string(p.join("subsysnqn")).unwrap_or_default();
                if sub.trim() != nqn {
                    continue;
                }
                for n in std::fs::read_dir(&p).unwrap().flatten() {
                    let name = n.file_name().to_string_lossy().into_owned();
                    let is_ns = name.starts_with("nvme")
                        && name[4..].split_once('n').is_some_and(|(a, b)| {
                            !a.is_empty()
                                && a.bytes().all(|c| c.is_ascii_digit())
                                && !b.is_empty()
                                && b.bytes().all(|c| c.is_ascii_digit())
                        });
                    if is_ns && Path::new(&format!("/dev/{name}")).exists() {
                        return format!("/dev/{name}");
                    }
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no namespace of {nqn} appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `nvme discover` against the testbed address on `port` (the kernel initiator).
pub fn discover(port: u16) -> Output {
    let port = port.to_string();
    sh(
        "nvme",
        &[
            "discover",
            "-t",
            "rdma",
            "-a",
            &env("NVMF_P2P_ADDR"),
            "-s",
            &port,
        ],
    )
}
