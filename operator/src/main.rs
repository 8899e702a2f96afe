//! `apiward` — the operator and CLI binary. See `cli` for the commands.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    apiward::cli::main()
}
