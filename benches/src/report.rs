//! The report of one `scripts/bench` run: reads the guest's `points.jsonl` (one record per
//! measured point and round) and the run's `meta.json`, and writes `results.json` (schema
//! in docs/bench.md), `report.md` and SVG plots; rewrites the README's generated section.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// The `schema` field of every results.json this code writes.
pub const SCHEMA: &str = "nvmf-p2p-bench/1";
/// README markers around the generated section.
pub const README_BEGIN: &str = "<!-- bench:begin -->";
pub const README_END: &str = "<!-- bench:end -->";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a point record: {source}")]
    Point {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{path}: not valid JSON of a {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{path}: schema is {found:?}, this generator reads {SCHEMA:?}")]
    Schema { path: PathBuf, found: String },
    #[error("{0}: no point records")]
    Empty(PathBuf),
    #[error("{path}: the markers {README_BEGIN} ... {README_END} (in this order) are missing")]
    Markers { path: PathBuf },
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Latency percentiles of one point, in microseconds.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p99_9: Option<f64>,
}

/// One measured point of one round, as the guest writes it (docs/bench.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Point {
    pub phase: String,
    pub target: String,
    pub initiator: String,
    pub workload: String,
    pub rw: String,
    pub bs: u64,
    pub qd: u32,
    pub read_pct: Option<u32>,
    pub round: u32,
    pub secs: Option<f64>,
    pub ok: bool,
    pub error: Option<String>,
    pub iops: Option<f64>,
    pub mib_s: Option<f64>,
    pub ios: Option<f64>,
    #[serde(default)]
    pub lat_us: Latency,
    pub target_cpu_us_per_io: Option<f64>,
    pub guest_cpu_us_per_io: Option<f64>,
    pub rdma_ops_per_io: Option<f64>,
}

/// Median and range of one metric over the rounds that measured it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = Option<f64>>) -> Option<Stat> {
        let mut v: Vec<f64> = values
            .into_iter()
            .flatten()
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// All rounds of one (target, initiator, workload).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Summary {
    pub phase: String,
    pub target: String,
    pub initiator: String,
    pub workload: String,
    pub rw: String,
    pub bs: u64,
    pub qd: u32,
    pub rounds: usize,
    pub rounds_ok: usize,
    pub errors: Vec<String>,
    pub iops: Option<Stat>,
    pub mib_s: Option<Stat>,
    pub lat_p50_us: Option<Stat>,
    pub lat_p99_us: Option<Stat>,
    pub lat_p99_9_us: Option<Stat>,
    pub target_cpu_us_per_io: Option<Stat>,
    pub guest_cpu_us_per_io: Option<Stat>,
    pub rdma_ops_per_io: Option<Stat>,
    /// Median IOPS over the kernel's at the same point (fabric: the kernel nvmet-rdma target
    /// with the same initiator, else with fio libaio; local: fio libaio on the kernel driver).
    pub vs_kernel: Option<f64>,
    /// Median IOPS over SPDK's (fabric: the better of nvmf_tgt polling / interrupt mode;
    /// local: spdk_nvme_perf on SPDK's driver).
    pub vs_spdk: Option<f64>,
    /// Median MiB/s as a fraction of rxe's ib_write_bw at the same block size.
    pub of_rxe_bw: Option<f64>,
}

/// results.json.
#[derive(Debug, Deserialize, Serialize)]
pub struct Results {
    pub schema: String,
    /// The run's name: the output directory's name, `<date>-<commit>`.
    pub run: String,
    pub meta: serde_json::Value,
    pub summary: Vec<Summary>,
    pub host_benches: HostBenches,
    pub points: Vec<Point>,
}

/// Host-side figures of the run (no VM).
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct HostBenches {
    /// The driver's instructions per I/O (callgrind), per queue depth.
    pub callgrind: Vec<Callgrind>,
    /// Criterion benches of the hot paths (benches/benches/*.rs).
    pub criterion: Vec<CriterionBench>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Callgrind {
    pub qd: u32,
    pub instructions_per_io: f64,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct CriterionBench {
    pub id: String,
    /// Median time of one iteration, nanoseconds.
    pub ns_per_iter: f64,
    /// The bounds of criterion's confidence interval of that median (95 % by default),
    /// nanoseconds per iteration; null when the estimate had none (optional in schema /1).
    #[serde(default)]
    pub low_ns: Option<f64>,
    #[serde(default)]
    pub high_ns: Option<f64>,
    /// Elements per iteration (the bench's declared throughput), when declared.
    pub elements: Option<u64>,
    pub ns_per_element: Option<f64>,
}

pub fn read_points(path: &Path) -> Result<Vec<Point>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        v.push(
            serde_json::from_str(line).map_err(|source| ReportError::Point {
                path: path.to_owned(),
                line: i + 1,
                source,
            })?,
        );
    }
    if v.is_empty() {
        return Err(ReportError::Empty(path.to_owned()));
    }
    Ok(v)
}

fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
) -> Result<T, ReportError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|source| ReportError::Json {
        path: path.to_owned(),
        what,
        source,
    })
}

/// Criterion's output directory (CRITERION_HOME): every `<bench>/new/{benchmark,estimates}.json`.
pub fn read_criterion(dir: &Path) -> Result<Vec<CriterionBench>, ReportError> {
    #[derive(Deserialize)]
    struct Bench {
        full_id: String,
        throughput: Option<BTreeMap<String, u64>>,
    }
    #[derive(Deserialize)]
    struct Interval {
        lower_bound: f64,
        upper_bound: f64,
    }
    #[derive(Deserialize)]
    struct Est {
        point_estimate: f64,
        confidence_interval: Option<Interval>,
    }
    #[derive(Deserialize)]
    struct Estimates {
        median: Est,
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let p = e.map_err(io(&d))?.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") && p.join("estimates.json").is_file() {
                    let b: Bench = read_json(&p.join("benchmark.json"), "criterion benchmark")?;
                    let est: Estimates =
                        read_json(&p.join("estimates.json"), "criterion estimate")?;
                    let elements = b
                        .throughput
                        .as_ref()
                        .and_then(|t| t.get("Elements").copied());
                    let ns = est.median.point_estimate;
                    let ci = est.median.confidence_interval;
                    out.push(CriterionBench {
                        id: b.full_id,
                        ns_per_iter: ns,
                        low_ns: ci.as_ref().map(|c| c.lower_bound),
                        high_ns: ci.as_ref().map(|c| c.upper_bound),
                        elements,
                        ns_per_element: elements.filter(|&n| n > 0).map(|n| ns / n as f64),
                    });
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Median of the rounds of every (target, initiator, workload), in the order of first appearance.
pub fn summarize(points: &[Point]) -> Vec<Summary> {
    let mut order: Vec<(String, String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String, String), Vec<&Point>> = BTreeMap::new();
    for p in points {
        let k = (p.target.clone(), p.initiator.clone(), p.workload.clone());
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(p);
    }
    let mut out: Vec<Summary> = order
        .iter()
        .map(|k| {
            let g = &groups[k];
            let ok: Vec<&&Point> = g.iter().filter(|p| p.ok).collect();
            let stat = |f: &dyn Fn(&Point) -> Option<f64>| Stat::of(ok.iter().map(|p| f(p)));
            let mut errors: Vec<String> = g.iter().filter_map(|p| p.error.clone()).collect();
            errors.dedup();
            let first = g[0];
            Summary {
                phase: first.phase.clone(),
                target: k.0.clone(),
                initiator: k.1.clone(),
                workload: k.2.clone(),
                rw: first.rw.clone(),
                bs: first.bs,
                qd: first.qd,
                rounds: g.len(),
                rounds_ok: ok.len(),
                errors,
                iops: stat(&|p| p.iops),
                mib_s: stat(&|p| p.mib_s),
                lat_p50_us: stat(&|p| p.lat_us.p50),
                lat_p99_us: stat(&|p| p.lat_us.p99),
                lat_p99_9_us: stat(&|p| p.lat_us.p99_9),
                target_cpu_us_per_io: stat(&|p| p.target_cpu_us_per_io),
                guest_cpu_us_per_io: stat(&|p| p.guest_cpu_us_per_io),
                rdma_ops_per_io: stat(&|p| p.rdma_ops_per_io),
                vs_kernel: None,
                vs_spdk: None,
                of_rxe_bw: None,
            }
        })
        .collect();
    let iops = |t: &str, i: &str, w: &str| -> Option<f64> {
        out.iter()
            .find(|s| s.target == t && s.initiator == i && s.workload == w)
            .and_then(|s| s.iops.map(|x| x.median))
            .filter(|&x| x > 0.0)
    };
    let rxe_bw = |bs: u64| -> Option<f64> {
        out.iter()
            .find(|s| s.target == "rxe" && s.initiator == "ib_write_bw" && s.bs == bs)
            .and_then(|s| s.mib_s.map(|x| x.median))
            .filter(|&x| x > 0.0)
    };
    let ratios: Vec<(Option<f64>, Option<f64>, Option<f64>)> = out
        .iter()
        .map(|s| {
            let Some(me) = s.iops.map(|x| x.median) else {
                return (None, None, None);
            };
            let w = s.workload.as_str();
            let (k, sp) = match s.phase.as_str() {
                "fabric" => {
                    let k = iops("kernel", &s.initiator, w).or(iops("kernel", "fio-libaio", w));
                    let best = |i: &str| match (iops("spdk", i, w), iops("spdk-irq", i, w)) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                    (k, best(&s.initiator).or(best("fio-libaio")))
                }
                "local" => (
                    iops("local-kernel", "fio-libaio", w),
                    iops("local-spdk", "spdk_nvme_perf", w),
                ),
                _ => (None, None),
            };
            let rxe = if s.phase == "fabric" {
                s.mib_s.and_then(|m| rxe_bw(s.bs).map(|c| m.median / c))
            } else {
                None
            };
            (k.map(|k| me / k), sp.map(|sp| me / sp), rxe)
        })
        .collect();
    for (s, (k, sp, rxe)) in out.iter_mut().zip(ratios) {
        s.vs_kernel = k;
        s.vs_spdk = sp;
        s.of_rxe_bw = rxe;
    }
    out
}

/// Builds results.json's content from the run's files.
pub fn build(
    points_path: &Path,
    meta_path: &Path,
    criterion: Option<&Path>,
    run: &str,
) -> Result<Results, ReportError> {
    let points = read_points(points_path)?;
    let meta: serde_json::Value = read_json(meta_path, "metadata object")?;
    let mut host = HostBenches::default();
    if let Some(cg) = meta.pointer("/host_benches/callgrind") {
        host.callgrind =
            serde_json::from_value(cg.clone()).map_err(|source| ReportError::Json {
                path: meta_path.to_owned(),
                what: "host_benches.callgrind list",
                source,
            })?;
    }
    if let Some(dir) = criterion {
        host.criterion = read_criterion(dir)?;
    }
    Ok(Results {
        schema: SCHEMA.into(),
        run: run.into(),
        meta,
        summary: summarize(&points),
        host_benches: host,
        points,
    })
}

pub fn read_results(path: &Path) -> Result<Results, ReportError> {
    let r: Results = read_json(path, "results.json")?;
    if r.schema != SCHEMA {
        return Err(ReportError::Schema {
            path: path.to_owned(),
            found: r.schema,
        });
    }
    Ok(r)
}

// ---------------------------------------------------------------- Markdown

fn num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}
fn med(s: Option<Stat>) -> String {
    s.map_or("–".into(), |s| num(s.median))
}
fn med_range(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.n > 1 && s.max > s.min => {
            format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
        }
        Some(s) => num(s.median),
        None => "–".into(),
    }
}
fn ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}x"))
}
fn meta_str(m: &serde_json::Value, ptr: &str) -> String {
    match m.pointer(ptr) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "?".into(),
        Some(v) => v.to_string(),
    }
}

/// Workloads in the order they were measured.
fn workloads(r: &Results, phase: &str) -> Vec<String> {
    let mut w: Vec<String> = Vec::new();
    for s in r.summary.iter().filter(|s| s.phase == phase) {
        if !w.contains(&s.workload) {
            w.push(s.workload.clone());
        }
    }
    w
}

/// The run's one-line description (commit, date, host load, versions).
pub fn run_line(r: &Results) -> String {
    let m = &r.meta;
    format!(
        "run `{}`: commit {}, {}, preset {} ({} s per point, {} rounds), host load {} before / {} after{}, QEMU {}, guest kernel {}",
        r.run,
        meta_str(m, "/commit"),
        meta_str(m, "/date"),
        meta_str(m, "/preset"),
        meta_str(m, "/secs_per_point"),
        meta_str(m, "/rounds"),
        meta_str(m, "/host/load_before"),
        meta_str(m, "/host/load_after"),
        if m.pointer("/forced") == Some(&serde_json::Value::Bool(true)) {
            " (--force)"
        } else {
            ""
        },
        meta_str(m, "/host/qemu"),
        meta_str(m, "/guest/guest_kernel"),
    )
}

/// The tables of one phase: one per workload (full: every column).
fn phase_tables(out: &mut String, r: &Results, phase: &str, full: bool) {
    for w in workloads(r, phase) {
        let _ = writeln!(out, "\n**{w}**\n");
        if full {
            out.push_str("| target | initiator | IOPS median (min–max) | MiB/s | p50 / p99 / p99.9 µs | target CPU µs/IO | guest CPU µs/IO | RDMA ops/IO | vs kernel | vs SPDK | of rxe bw |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
        } else {
            out.push_str("| target | initiator | IOPS median (min–max) | p50 / p99 µs | target CPU µs/IO | vs kernel | vs SPDK |\n|---|---|---|---|---|---|---|\n");
        }
        for s in r
            .summary
            .iter()
            .filter(|s| s.phase == phase && s.workload == w)
        {
            if s.rounds_ok == 0 {
                let _ = writeln!(
                    out,
                    "| {} | {} | failed: {} |{}",
                    s.target,
                    s.initiator,
                    s.errors
                        .first()
                        .map_or("no result", |e| e.as_str())
                        .replace('|', "/"),
                    if full { " | | | | | | | |" } else { " | | | |" }
                );
                continue;
            }
            if full {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} |",
                    s.target,
                    s.initiator,
                    med_range(s.iops),
                    med(s.mib_s),
                    med(s.lat_p50_us),
                    med(s.lat_p99_us),
                    med(s.lat_p99_9_us),
                    med(s.target_cpu_us_per_io),
                    med(s.guest_cpu_us_per_io),
                    med(s.rdma_ops_per_io),
                    ratio(s.vs_kernel),
                    ratio(s.vs_spdk),
                    s.of_rxe_bw
                        .map_or("–".into(), |f| format!("{:.0} %", f * 100.0)),
                );
            } else {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} / {} | {} | {} | {} |",
                    s.target,
                    s.initiator,
                    med_range(s.iops),
                    med(s.lat_p50_us),
                    med(s.lat_p99_us),
                    med(s.target_cpu_us_per_io),
                    ratio(s.vs_kernel),
                    ratio(s.vs_spdk),
                );
            }
        }
    }
}

fn rxe_table(out: &mut String, r: &Results) {
    let rxe: Vec<&Summary> = r.summary.iter().filter(|s| s.phase == "rxe").collect();
    if rxe.is_empty() {
        return;
    }
    out.push_str("\n| rxe (perftest) | size | messages/s | MiB/s | typical / 99 % / 99.9 % µs |\n|---|---|---|---|---|\n");
    for s in rxe {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} / {} |",
            s.initiator,
            s.bs,
            med_range(s.iops),
            med_range(s.mib_s),
            med(s.lat_p50_us),
            med(s.lat_p99_us),
            med(s.lat_p99_9_us)
        );
    }
}

fn host_tables(out: &mut String, r: &Results) {
    let h = &r.host_benches;
    if !h.callgrind.is_empty() {
        out.push_str(
            "\n| NVMe driver, callgrind (simulator excluded) | instructions per I/O |\n|---|---|\n",
        );
        for c in &h.callgrind {
            let _ = writeln!(out, "| QD{} | {:.0} |", c.qd, c.instructions_per_io);
        }
    }
    if !h.criterion.is_empty() {
        out.push_str("\n| criterion bench (host, `bench` profile) | ns per iteration, median (confidence interval) | elements | ns per element |\n|---|---|---|---|\n");
        for c in &h.criterion {
            let ci = match (c.low_ns, c.high_ns) {
                (Some(l), Some(h)) => format!(" ({}–{})", num(l), num(h)),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "| {} | {}{ci} | {} | {} |",
                c.id,
                num(c.ns_per_iter),
                c.elements.map_or("–".into(), |n| n.to_string()),
                c.ns_per_element.map_or("–".into(), num)
            );
        }
    }
}

/// report.md
pub fn markdown(r: &Results, svgs: &[String]) -> String {
    let mut out = format!(
        "# nvmf-p2p benchmark {}\n\n{}.\n\nTestbed figures (QEMU TCG, soft-RoCE in loopback, emulated NVMe): compare ratios within this run only. Medians over rounds, (min–max) where more than one round measured; ratios are of median IOPS. Schema and field meanings: docs/bench.md.\n",
        r.run,
        run_line(r)
    );
    for (phase, title) in [
        ("fabric", "NVMe-oF over RDMA"),
        ("local", "Local drivers (same NVMe)"),
    ] {
        if r.summary.iter().any(|s| s.phase == phase) {
            let _ = writeln!(out, "\n## {title}");
            phase_tables(&mut out, r, phase, true);
        }
    }
    if r.summary.iter().any(|s| s.phase == "rxe") {
        out.push_str("\n## Testbed ceilings (soft-RoCE)\n");
        rxe_table(&mut out, r);
    }
    if !r.host_benches.callgrind.is_empty() || !r.host_benches.criterion.is_empty() {
        out.push_str("\n## Host-side hot paths\n");
        host_tables(&mut out, r);
    }
    if !svgs.is_empty() {
        out.push_str("\n## Plots\n\n");
        for s in svgs {
            let _ = writeln!(out, "![{s}]({s})");
        }
    }
    out
}

/// The README's generated section (between the markers, markers excluded).
pub fn readme_section(r: &Results, report_path: &str) -> String {
    let mut out = format!(
        "\n\n_Generated by `scripts/bench --readme` from {report_path} ({})._\n",
        run_line(r)
    );
    for (phase, title) in [("fabric", "NVMe-oF over RDMA"), ("local", "Local drivers")] {
        if r.summary.iter().any(|s| s.phase == phase) {
            let _ = writeln!(out, "\n#### {title}");
            phase_tables(&mut out, r, phase, false);
        }
    }
    if r.summary.iter().any(|s| s.phase == "rxe") {
        out.push_str("\n#### Testbed ceilings (soft-RoCE)\n");
        rxe_table(&mut out, r);
    }
    host_tables(&mut out, r);
    out.push('\n');
    out
}

/// README text with the part between the markers replaced by `section`.
pub fn replace_marked(text: &str, section: &str, path: &Path) -> Result<String, ReportError> {
    let markers = || ReportError::Markers {
        path: path.to_owned(),
    };
    let b = text.find(README_BEGIN).ok_or_else(markers)? + README_BEGIN.len();
    let e = b + text[b..].find(README_END).ok_or_else(markers)?;
    Ok(format!("{}{}{}", &text[..b], section, &text[e..]))
}

// ---------------------------------------------------------------- SVG

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One horizontal bar chart: a group of bars per category (`series` bars each, median
/// length, min–max whisker when the rounds differ); category names on the left, so
/// long `target / initiator` names stay readable.
fn bars(
    path: &Path,
    title: &str,
    x_label: &str,
    categories: &[String],
    series: &[&str],
    values: &[Vec<Option<Stat>>],
) -> Result<(), ReportError> {
    let plot_err = |e: &dyn std::fmt::Display| ReportError::Plot {
        path: path.to_owned(),
        msg: e.to_string(),
    };
    let g = series.len().max(1) as u32;
    let slots = categories.len() as u32 * (g + 1);
    let xmax = values
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.max)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let name_px = categories.iter().map(|c| c.len()).max().unwrap_or(8) as u32 * 7 + 20;
    let height = (120 + slots * 16).max(260);
    let root = SVGBackend::new(path, (name_px + 620, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(name_px)
        .build_cartesian_2d(0.0..xmax, (0..slots).into_segmented())
        .map_err(|e| plot_err(&e))?;
    // slot k of category c, series j: k = c * (g + 1) + j (+1 slot of gap); the first
    // category at the top
    let slot = |c: usize, j: usize| slots - 1 - (c as u32 * (g + 1) + j as u32);
    let label = |v: &SegmentValue<u32>| -> String {
        match v {
            SegmentValue::CenterOf(k) => match (slots - 1).checked_sub(*k) {
                Some(top) if top % (g + 1) == (g - 1) / 2 => categories
                    .get((top / (g + 1)) as usize)
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            },
            _ => String::new(),
        }
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .y_labels(slots as usize + 1)
        .y_label_formatter(&label)
        .x_label_formatter(&|x| num(*x))
        .x_desc(x_label)
        .draw()
        .map_err(|e| plot_err(&e))?;
    for (j, name) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let bars = values.iter().enumerate().filter_map(|(c, row)| {
            let s = row.get(j).copied().flatten()?;
            let k = slot(c, j);
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(k)),
                    (s.median, SegmentValue::Exact(k + 1)),
                ],
                color.filled(),
            );
            r.set_margin(1, 1, 0, 0);
            Some(r)
        });
        chart
            .draw_series(bars)
            .map_err(|e| plot_err(&e))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        let whiskers = values.iter().enumerate().filter_map(|(c, row)| {
            let s = row.get(j).copied().flatten()?;
            (s.max > s.min).then(|| {
                ErrorBar::new_horizontal(
                    SegmentValue::CenterOf(slot(c, j)),
                    s.min,
                    s.median,
                    s.max,
                    BLACK.stroke_width(1),
                    8,
                )
            })
        });
        chart.draw_series(whiskers).map_err(|e| plot_err(&e))?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(&e))?;
    }
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}

/// The run's plots, per fabric/local workload: IOPS (min–max whiskers), latency
/// percentiles, CPU per I/O. Returns the file names written (relative to `dir`).
pub fn plots(r: &Results, dir: &Path) -> Result<Vec<String>, ReportError> {
    let mut names = Vec::new();
    for phase in ["fabric", "local"] {
        for w in workloads(r, phase) {
            let rows: Vec<&Summary> = r
                .summary
                .iter()
                .filter(|s| s.phase == phase && s.workload == w && s.rounds_ok > 0)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let cats: Vec<String> = rows
                .iter()
                .map(|s| format!("{} / {}", s.target, s.initiator))
                .collect();
            let mut plot = |kind: &str,
                            title: String,
                            y: &str,
                            series: &[&str],
                            f: &dyn Fn(&Summary) -> Vec<Option<Stat>>|
             -> Result<(), ReportError> {
                let name = format!("{kind}-{phase}-{w}.svg");
                let vals: Vec<Vec<Option<Stat>>> = rows.iter().map(|s| f(s)).collect();
                if vals.iter().flatten().all(Option::is_none) {
                    return Ok(());
                }
                bars(&dir.join(&name), &title, y, &cats, series, &vals)?;
                names.push(name);
                Ok(())
            };
            plot(
                "iops",
                format!("{w}: IOPS (median, min–max) — {}", r.run),
                "IOPS",
                &["IOPS"],
                &|s| vec![s.iops],
            )?;
            plot(
                "latency",
                format!("{w}: completion latency — {}", r.run),
                "µs",
                &["p50", "p99", "p99.9"],
                &|s| vec![s.lat_p50_us, s.lat_p99_us, s.lat_p99_9_us],
            )?;
            plot(
                "cpu",
                format!("{w}: CPU per I/O — {}", r.run),
                "µs per I/O",
                &["target process", "whole guest"],
                &|s| vec![s.target_cpu_us_per_io, s.guest_cpu_us_per_io],
            )?;
        }
    }
    Ok(names)
}

/// Writes results.json, report.md and the plots into `dir`.
pub fn write_all(r: &Results, dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let svgs = plots(r, dir)?;
    let p = dir.join("results.json");
    let json = serde_json::to_string_pretty(r).map_err(|source| ReportError::Json {
        path: p.clone(),
        what: "results.json",
        source,
    })?;
    std::fs::write(&p, json + "\n").map_err(io(&p))?;
    let p = dir.join("report.md");
    std::fs::write(&p, markdown(r, &svgs)).map_err(io(&p))?;
    Ok(())
}
