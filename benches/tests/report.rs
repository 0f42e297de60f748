//! bench-report on a small fixture (tests/fixtures: points.jsonl of 3 rounds, meta.json, a
//! criterion output directory): results.json follows the schema of docs/bench.md, the SVG
//! plots exist and are SVG, and `--readme` replaces only the marked README section.
//!
//! `NVMF_P2P_BENCH_RESULTS=bench-results/<run>/results.json` also checks a real run's
//! results.json (and its plots) against the same schema, e.g. after
//! `scripts/bench --only smoke`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bench-report");
const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bench-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&Path]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run bench-report")
}

/// Generates the fixture's report into DIR/20261201-000000-abc1234; returns that directory.
fn generate(dir: &Path) -> PathBuf {
    let out = dir.join("20261201-000000-abc1234");
    let f = fixtures();
    let o = run(&[
        Path::new("--points"),
        &f.join("points.jsonl"),
        Path::new("--meta"),
        &f.join("meta.json"),
        Path::new("--criterion"),
        &f.join("crit"),
        Path::new("--out"),
        &out,
    ]);
    assert!(
        o.status.success(),
        "bench-report failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `obj[key]` exists and is one of `kinds` ("number|null" style).
fn field<'a>(obj: &'a Value, key: &str, kinds: &str, ctx: &str) -> &'a Value {
    let v = obj
        .get(key)
        .unwrap_or_else(|| panic!("{ctx}: field {key} missing in {obj}"));
    assert!(
        kinds.split('|').any(|k| k == kind(v)),
        "{ctx}: {key} is {} ({v}), want {kinds}",
        kind(v)
    );
    v
}

fn check_stat(v: &Value, ctx: &str) {
    if v.is_null() {
        return;
    }
    let med = field(v, "median", "number", ctx).as_f64().unwrap();
    let min = field(v, "min", "number", ctx).as_f64().unwrap();
    let max = field(v, "max", "number", ctx).as_f64().unwrap();
    assert!(field(v, "n", "number", ctx).as_u64().unwrap() >= 1, "{ctx}");
    assert!(
        min <= med && med <= max,
        "{ctx}: min {min} median {med} max {max}"
    );
}

/// results.json against docs/bench.md's schema; returns it.
fn check_schema(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r: Value = serde_json::from_str(&text).expect("results.json is JSON");
    assert_eq!(
        field(&r, "schema", "string", "top").as_str(),
        Some("nvmf-p2p-bench/1")
    );
    let run = field(&r, "run", "string", "top").as_str().unwrap();
    assert!(!run.is_empty());
    let meta = field(&r, "meta", "object", "top");
    field(meta, "commit", "string", "meta");
    field(meta, "date", "string", "meta");
    for k in ["preset", "only"] {
        field(meta, k, "string", "meta");
    }
    for k in ["secs_per_point", "rounds"] {
        field(meta, k, "number", "meta");
    }
    let host = field(meta, "host", "object", "meta");
    field(host, "load_before", "number", "meta.host");
    field(host, "load_after", "number", "meta.host");
    field(host, "qemu", "string", "meta.host");
    let guest = field(meta, "guest", "object", "meta");
    field(guest, "guest_kernel", "string", "meta.guest");

    let points = field(&r, "points", "array", "top").as_array().unwrap();
    assert!(!points.is_empty(), "no points");
    for (i, p) in points.iter().enumerate() {
        let c = format!("points[{i}]");
        for k in ["phase", "target", "initiator", "workload", "rw"] {
            field(p, k, "string", &c);
        }
        for k in ["bs", "qd", "round"] {
            field(p, k, "number", &c);
        }
        let ok = field(p, "ok", "bool", &c).as_bool().unwrap();
        field(p, "error", if ok { "null" } else { "string" }, &c);
        for k in [
            "iops",
            "mib_s",
            "ios",
            "target_cpu_us_per_io",
            "guest_cpu_us_per_io",
            "rdma_ops_per_io",
        ] {
            field(p, k, "number|null", &c);
        }
        let lat = field(p, "lat_us", "object", &c);
        for k in ["p50", "p99", "p99_9"] {
            field(lat, k, "number|null", &c);
        }
        assert!(
            ["fabric", "local", "rxe"].contains(&p["phase"].as_str().unwrap()),
            "{c}: phase {}",
            p["phase"]
        );
        if ok && p["phase"] != "rxe" {
            assert!(p["iops"].as_f64().unwrap() > 0.0, "{c}: ok without IOPS");
        }
    }
    let summary = field(&r, "summary", "array", "top").as_array().unwrap();
    assert!(!summary.is_empty(), "no summary");
    for (i, s) in summary.iter().enumerate() {
        let c = format!("summary[{i}]");
        for k in ["phase", "target", "initiator", "workload", "rw"] {
            field(s, k, "string", &c);
        }
        for k in ["bs", "qd", "rounds", "rounds_ok"] {
            field(s, k, "number", &c);
        }
        field(s, "errors", "array", &c);
        for k in [
            "iops",
            "mib_s",
            "lat_p50_us",
            "lat_p99_us",
            "lat_p99_9_us",
            "target_cpu_us_per_io",
            "guest_cpu_us_per_io",
            "rdma_ops_per_io",
        ] {
            check_stat(field(s, k, "object|null", &c), &format!("{c}.{k}"));
        }
        for k in ["vs_kernel", "vs_spdk", "of_rxe_bw"] {
            field(s, k, "number|null", &c);
        }
    }
    let hb = field(&r, "host_benches", "object", "top");
    for c in field(hb, "callgrind", "array", "host_benches")
        .as_array()
        .unwrap()
    {
        field(c, "qd", "number", "callgrind");
        field(c, "instructions_per_io", "number", "callgrind");
    }
    for c in field(hb, "criterion", "array", "host_benches")
        .as_array()
        .unwrap()
    {
        field(c, "id", "string", "criterion");
        field(c, "ns_per_iter", "number", "criterion");
        field(c, "elements", "number|null", "criterion");
        field(c, "ns_per_element", "number|null", "criterion");
        // optional in schema /1 (results.json of runs before they were recorded lack them)
        for k in ["low_ns", "high_ns"] {
            if let Some(v) = c.get(k) {
                assert!(v.is_number() || v.is_null(), "criterion.{k}: {v}");
            }
        }
    }
    r
}

/// At least one IOPS plot; every *.svg in DIR is an SVG document.
fn check_svgs(dir: &Path) -> usize {
    let mut n = 0;
    let mut iops = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "svg") {
            let t = std::fs::read_to_string(&p).unwrap();
            let head = t.trim_start();
            assert!(
                head.starts_with("<svg") || head.starts_with("<?xml"),
                "{}: not SVG: {:?}",
                p.display(),
                &t[..t.len().min(60)]
            );
            assert!(
                t.trim_end().ends_with("</svg>"),
                "{}: truncated",
                p.display()
            );
            n += 1;
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("iops-")
            {
                iops += 1;
            }
        }
    }
    assert!(iops >= 1, "no IOPS plot in {}", dir.display());
    n
}

fn summary<'a>(r: &'a Value, target: &str, initiator: &str, workload: &str) -> &'a Value {
    r["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["target"] == target && s["initiator"] == initiator && s["workload"] == workload)
        .unwrap_or_else(|| panic!("no summary of {target}/{initiator}/{workload}"))
}

#[test]
fn report_of_the_fixture_follows_the_schema() {
    let dir = scratch("schema");
    let out = generate(&dir);
    let r = check_schema(&out.join("results.json"));
    assert_eq!(r["run"], "20261201-000000-abc1234");
    assert_eq!(r["meta"]["commit"], "abc1234");

    // medians and ranges over the 3 rounds, ratios of medians
    let k = summary(&r, "kernel", "fio-libaio", "randread-4k-qd32");
    assert_eq!(k["iops"]["median"], 2200.0);
    assert_eq!(k["iops"]["min"], 2100.0);
    assert_eq!(k["iops"]["max"], 2300.0);
    assert_eq!(k["vs_kernel"], 1.0);
    let o = summary(&r, "ours-vfio", "fio-libaio", "randread-4k-qd32");
    let vk = o["vs_kernel"].as_f64().unwrap();
    assert!((vk - 1700.0 / 2200.0).abs() < 1e-9, "{vk}");
    let vs = o["vs_spdk"].as_f64().unwrap();
    assert!((vs - 1700.0 / 1450.0).abs() < 1e-9, "{vs}");
    let rxe = o["of_rxe_bw"].as_f64().unwrap();
    assert!(rxe > 0.0 && rxe < 1.0, "{rxe}");
    // the failed target: rounds counted, its reason kept, no figures
    let f = summary(&r, "ours-spdk", "fio-libaio", "randread-4k-qd32");
    assert_eq!(f["rounds"], 3);
    assert_eq!(f["rounds_ok"], 0);
    assert!(f["iops"].is_null());
    assert!(f["errors"][0]
        .as_str()
        .unwrap()
        .contains("SPDK is not built"));
    // local ratios are against the kernel driver
    let l = summary(&r, "local-ours", "perf", "randread-4k-qd32");
    assert!((l["vs_kernel"].as_f64().unwrap() - 9200.0 / 4000.0).abs() < 1e-9);
    // host benches: callgrind from meta, criterion from the directory
    assert_eq!(
        r["host_benches"]["callgrind"][0]["instructions_per_io"],
        149.0
    );
    assert_eq!(
        r["host_benches"]["criterion"][0]["id"],
        "hot_paths/sqe_build"
    );
    assert_eq!(r["host_benches"]["criterion"][0]["ns_per_element"], 2.0);
    // the median's confidence interval from estimates.json
    assert_eq!(r["host_benches"]["criterion"][0]["low_ns"], 60.0);
    assert_eq!(r["host_benches"]["criterion"][0]["high_ns"], 70.0);

    assert!(
        check_svgs(&out) >= 3 * 3,
        "IOPS, latency and CPU plots per workload"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("20261201-000000-abc1234"),
        "report names the run"
    );
    assert!(
        md.contains("| ours-vfio | fio-libaio | 1700 (1650–1800)"),
        "{md}"
    );
    assert!(
        md.contains("0.77x"),
        "ratio to the kernel target in the report:\n{md}"
    );
    assert!(md.contains("failed: target did not start"), "{md}");
    // the timed criterion benches: median (confidence interval), elements, per element
    assert!(md.contains("## Host-side hot paths"), "{md}");
    assert!(
        md.contains("| hot_paths/sqe_build | 64.0 (60.0–70.0) | 32 | 2.00 |"),
        "criterion table in the report:\n{md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = scratch("bad");
    let bad = dir.join("points.jsonl");
    std::fs::write(&bad, "{\"phase\": \"fabric\"}\n").unwrap();
    let o = run(&[
        Path::new("--points"),
        &bad,
        Path::new("--meta"),
        &fixtures().join("meta.json"),
        Path::new("--out"),
        &dir.join("out"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("points.jsonl:1: not a point record"), "{err}");
    let o = run(&[Path::new("--bogus")]);
    assert_eq!(o.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn readme_replaces_only_the_marked_section() {
    let dir = scratch("readme");
    let out = generate(&dir);
    let readme = dir.join("README.md");
    let before = format!("# title\n\nHand-written prose before.\n\n{BEGIN}\n");
    let after = format!("{END}\n\nHand-written prose after, {BEGIN} not again.\n");
    std::fs::write(&readme, format!("{before}| old | table |\n{after}")).unwrap();
    let o = run(&[
        Path::new("--readme"),
        &out.join("results.json"),
        Path::new("--readme-file"),
        &readme,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&readme).unwrap();
    assert!(
        text.starts_with(&before),
        "prose before the section changed:\n{text}"
    );
    assert!(
        text.ends_with(&after),
        "prose after the section changed:\n{text}"
    );
    let section = &text[before.len()..text.len() - after.len()];
    assert!(!section.contains("| old | table |"), "{section}");
    assert!(
        section.contains("20261201-000000-abc1234"),
        "the section names the run"
    );
    assert!(section.contains("commit abc1234"), "{section}");
    assert!(section.contains("| ours-vfio | fio-libaio |"), "{section}");
    // the section names the report by a path relative to the README
    assert!(
        section.contains("`20261201-000000-abc1234/report.md`"),
        "{section}"
    );

    // idempotent: a second run gives the same text
    let o = run(&[
        Path::new("--readme"),
        &out.join("results.json"),
        Path::new("--readme-file"),
        &readme,
    ]);
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), text);

    // no markers: an error, the file untouched
    let plain = dir.join("PLAIN.md");
    std::fs::write(&plain, "no markers here\n").unwrap();
    let o = run(&[
        Path::new("--readme"),
        &out.join("results.json"),
        Path::new("--readme-file"),
        &plain,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("markers"));
    assert_eq!(
        std::fs::read_to_string(&plain).unwrap(),
        "no markers here\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_readme_has_the_markers_once() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    assert_eq!(text.matches(BEGIN).count(), 1, "{BEGIN} in README.md");
    assert_eq!(text.matches(END).count(), 1, "{END} in README.md");
    assert!(text.find(BEGIN) < text.find(END));
}

/// A real run's results.json (set NVMF_P2P_BENCH_RESULTS), e.g. of `scripts/bench --only smoke`.
#[test]
fn a_real_run_follows_the_schema() {
    let Some(p) = std::env::var_os("NVMF_P2P_BENCH_RESULTS") else {
        eprintln!("skipped: NVMF_P2P_BENCH_RESULTS is not set");
        return;
    };
    let p = PathBuf::from(p);
    let r = check_schema(&p);
    assert!(
        r["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["ok"] == true),
        "no point of the run was measured"
    );
    check_svgs(p.parent().unwrap());
}
