//! Host tests of the `nvmf-p2p` binary's operator surface that need no RDMA device or
//! VFIO: `serve --print-config` (template and the checks serve makes), `bind --config`
//! on a configuration without PCI namespaces, `stats --format prometheus` against a
//! stand-in control socket, and the flag vocabulary of `perf` and `direct`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvmf-p2p"));
    c.env("NO_COLOR", "1");
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nvmf-p2p-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `serve --print-config --config FILE` with `text` as the file.
fn print_config(name: &str, text: &str) -> Output {
    let path = scratch(name);
    std::fs::write(&path, text).unwrap();
    run(&[
        "serve",
        "--print-config",
        "--config",
        path.to_str().unwrap(),
    ])
}

const RAM: &str = "[[listener]]\naddress = \"127.0.0.1\"\n\n[[subsystem]]\n\
                   nqn = \"nqn.2026-11.io.example:disk0\"\nallow_any_host = true\n\
                   [[subsystem.namespace]]\nbackend = \"ram:1MiB\"\n";

#[test]
fn print_config_without_config_is_the_packaged_template() {
    let o = run(&["serve", "--print-config"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let packaged = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/target.toml"),
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), packaged);
    for key in [
        "cores",
        "max_io_queues",
        "max_io_size",
        "data_buffers",
        "model",
        "direct_port",
    ] {
        assert!(
            packaged.contains(&format!("\n{key} = ")),
            "template lacks {key}"
        );
    }
    assert!(
        packaged.contains("vfio:BDF[:NSID]"),
        "template lacks the :NSID suffix"
    );
}

#[test]
fn serve_without_config_says_how_to_get_one() {
    let o = run(&["serve"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--print-config"), "{}", stderr(&o));
}

#[test]
fn print_config_checks_like_serve() {
    // good: defaults filled in, trtype defaulted
    let o = print_config("good.toml", RAM);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("trtype = \"rdma\"") && out.contains("queue_depth = 128"),
        "{out}"
    );
    // no listener
    let o = print_config("nolistener.toml", "queue_depth = 64\n");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("field `listener`"), "{}", stderr(&o));
    // a core that does not exist, with its line
    let o = print_config("cores.toml", &format!("cores = [0, 99999]\n{RAM}"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cores.toml:1:") && e.contains("field `cores[1]`"),
        "{e}"
    );
    // a PCI device that is not there
    let o = print_config("bdf.toml", &RAM.replace("ram:1MiB", "vfio:0000:7f:1f.7"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("no PCI device 0000:7f:1f.7") && e.contains("bdf.toml:8:"),
        "{e}"
    );
    // [listener] for [[listener]]
    let o = print_config("table.toml", &RAM.replace("[[listener]]", "[listener]"));
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("table.toml:1:") && e.contains("field `listener`") && e.contains("[[listener]]"),
        "{e}"
    );
}

#[test]
fn bind_config_without_pci_namespaces_is_a_successful_no_op() {
    let path = scratch("bind.toml");
    std::fs::write(&path, RAM).unwrap();
    let o = run(&["bind", "--config", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to bind"));
    let o = run(&["bind"]);
    assert!(
        !o.status.success(),
        "bind without a device or --config must fail"
    );
}

#[test]
fn stats_prometheus_from_the_control_socket() {
    let sock = scratch("control.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), r#"{"cmd":"stats"}"#);
        let reply = serde_json::json!({"ok": true,
            "subsystems": [{"nqn": "nqn.2026-11.io.example:disk0", "namespaces": []}],
            "controllers": [{"cntlid": 3, "subnqn": "nqn.2026-11.io.example:disk0",
                             "hostnqn": "nqn.2014-08.org.nvmexpress:uuid:1", "ready": true,
                             "read_commands": 12, "write_commands": 0, "bytes_read": 49152,
                             "bytes_written": 0, "errors": 0}]});
        writeln!(&conn, "{reply}").unwrap();
    });
    let o = run(&[
        "stats",
        "--socket",
        sock.to_str().unwrap(),
        "--format",
        "prometheus",
    ]);
    server.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("# TYPE nvmf_p2p_controller_read_commands_total counter\n"),
        "{out}"
    );
    assert!(out.contains(
        "nvmf_p2p_controller_read_commands_total{subsystem=\"nqn.2026-11.io.example:disk0\",controller=\"3\",host=\"nqn.2014-08.org.nvmexpress:uuid:1\"} 12\n"
    ), "{out}");
}

#[test]
fn perf_and_direct_share_the_flag_vocabulary_and_the_host_nqn() {
    let help = |cmd: &str| String::from_utf8_lossy(&run(&[cmd, "--help"]).stdout).into_owned();
    let (perf, direct) = (help("perf"), help("direct"));
    for flag in [
        "-q, --queue-depth",
        "-o, --io-size",
        "-w, --workload",
        "-t, --time",
    ] {
        assert!(
            perf.contains(flag) && direct.contains(flag),
            "{flag} missing"
        );
    }
    for alias in ["[alias: --qd]", "[alias: --bs]", "[alias: --rw]"] {
        assert!(direct.contains(alias), "direct lost the old {alias}");
    }
    let default = |h: &str| {
        let at = h.find("--hostnqn").expect("--hostnqn");
        let d = &h[at..];
        d[d.find("[default: ").unwrap() + 10..]
            .split(']')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(default(&perf), default(&direct));
    // the 8 KiB limit of direct queues is explained, before any connection is tried
    let o = run(&[
        "direct",
        "--traddr",
        "127.0.0.1",
        "--subnqn",
        "nqn.2026-11.io.x:a",
        "-o",
        "16k",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("at most 8192 bytes per I/O") && e.contains("PRP"),
        "{e}"
    );
}
