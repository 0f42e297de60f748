//! `nvmf-p2p stats [--socket PATH] [--json]` — a client of the control socket of a
//! running `nvmf-p2p serve` (`ctl` is in `ctl.rs`).
use std::path::PathBuf;

use serde_json::Value;

use super::{print_json, CliError, CliResult};
use crate::control::{self, Request};

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Control socket of the target (the `control_socket` of its config).
    #[arg(long, default_value = transport::config::DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
    /// Print JSON instead of text (same as `--format json`).
    #[arg(long)]
    pub json: bool,
    /// Output format: `text`, `json`, or `prometheus` (text exposition format 0.0.4,
    /// what the `[metrics] listen` endpoint of serve answers).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Prometheus,
}

pub fn run_stats(a: StatsArgs) -> CliResult {
    let v = control::request(&a.socket, &Request::Stats).map_err(CliError)?;
    if a.json || a.format == Format::Json {
        return print_json(&v);
    }
    if a.format == Format::Prometheus {
        print!("{}", crate::metrics::render(&v));
        return Ok(());
    }
    print_text(&v, 0);
    Ok(())
}

/// Indented `key: value` text of a JSON reply; arrays of objects become numbered blocks.
pub(super) fn print_text(v: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                match val {
                    Value::Object(_) | Value::Array(_) => {
                        println!("{pad}{k}:");
                        print_text(val, indent + 1);
                    }
                    _ => println!("{pad}{k}: {}", scalar(val)),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        println!("{pad}[{i}]");
                        print_text(item, indent + 1);
                    }
                    _ => println!("{pad}- {}", scalar(item)),
                }
            }
        }
        other => println!("{pad}{}", scalar(other)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
