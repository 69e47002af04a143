//! The `rankpilot` binary: the command-line interface over the workspace's libraries. Its
//! modules are private, as in ripgrep: no library imports the CLI.

mod cli;
mod commands;
mod device;

fn main() {
    std::process::exit(cli::main());
}
