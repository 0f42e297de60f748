//! `bench-report` — the report of one `scripts/bench` run (docs/bench.md).
//!
//!   bench-report --points POINTS.jsonl --meta META.json [--criterion DIR] --out DIR
//!   bench-report --readme RESULTS.json [--readme-file README.md]
//!
//! The first form writes DIR/results.json, DIR/report.md and DIR/*.svg (the run's name is
//! DIR's name); the second rewrites the README's section between `<!-- bench:begin -->`
//! and `<!-- bench:end -->` from a results.json, naming the run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nvmf_p2p_benches::report;

const USAGE: &str = "usage: bench-report --points POINTS.jsonl --meta META.json [--criterion DIR] --out DIR\n       bench-report --readme RESULTS.json [--readme-file README.md]";

#[derive(Default)]
struct Args {
    points: Option<PathBuf>,
    meta: Option<PathBuf>,
    criterion: Option<PathBuf>,
    out: Option<PathBuf>,
    readme: Option<PathBuf>,
    readme_file: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let slot = match flag.to_str() {
            Some("--points") => &mut a.points,
            Some("--meta") => &mut a.meta,
            Some("--criterion") => &mut a.criterion,
            Some("--out") => &mut a.out,
            Some("--readme") => &mut a.readme,
            Some("--readme-file") => &mut a.readme_file,
            Some("-h" | "--help") => return Err(String::new()),
            _ => return Err(format!("unknown argument {flag:?}")),
        };
        *slot = Some(
            it.next()
                .ok_or_else(|| format!("{flag:?} needs a value"))?
                .into(),
        );
    }
    Ok(a)
}

/// README section: the report's path as the README sees it (relative when it can be).
fn readme(results: &Path, readme: &Path) -> Result<(), report::ReportError> {
    let r = report::read_results(results)?;
    let report_md = results.with_file_name("report.md");
    let base = readme.parent().unwrap_or(Path::new("."));
    let shown = std::path::absolute(&report_md)
        .ok()
        .zip(std::path::absolute(base).ok())
        .and_then(|(p, b)| p.strip_prefix(&b).ok().map(Path::to_owned))
        .unwrap_or(report_md);
    let text = std::fs::read_to_string(readme).map_err(|source| report::ReportError::Io {
        path: readme.to_owned(),
        source,
    })?;
    let section = report::readme_section(&r, &format!("`{}`", shown.display()));
    let new = report::replace_marked(&text, &section, readme)?;
    std::fs::write(readme, new).map_err(|source| report::ReportError::Io {
        path: readme.to_owned(),
        source,
    })?;
    println!(
        "{}: results section rewritten from run {}",
        readme.display(),
        r.run
    );
    Ok(())
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bench-report: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = if let Some(results) = &a.readme {
        let file = a.readme_file.clone().unwrap_or_else(|| "README.md".into());
        readme(results, &file)
    } else if let (Some(points), Some(meta), Some(out)) = (&a.points, &a.meta, &a.out) {
        let run = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        report::build(points, meta, a.criterion.as_deref(), &run)
            .and_then(|r| report::write_all(&r, out))
            .map(|()| println!("{}: results.json, report.md, plots", out.display()))
    } else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}
