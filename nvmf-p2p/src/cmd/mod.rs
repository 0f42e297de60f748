//! One module per subcommand. Every `run` returns `Result<(), CliError>`; the message of
//! the error is what the user sees, so it says what to do.

pub mod bind;
pub mod ctl;
pub mod direct;
pub mod perf;
pub mod perf_direct;
pub mod probe;
pub mod serve;
pub mod stats;

/// An error a subcommand reports to the user: one sentence, printed after `nvmf-p2p: `.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl CliError {
    pub fn new(msg: impl Into<String>) -> Self {
        CliError(msg.into())
    }
}

pub type CliResult = Result<(), CliError>;

/// Print `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> CliResult {
    let s = serde_json::to_string_pretty(value).map_err(|e| CliError::new(e.to_string()))?;
    println!("{s}");
    Ok(())
}
