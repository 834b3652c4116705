//! The `thaw` command: argument parsing, logging and exit codes; the work is in the
//! `thaw_client` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
