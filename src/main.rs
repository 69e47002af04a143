//! The `rankpilot` binary: a thin shell over [`rankpilot::cli`].

fn main() {
    std::process::exit(rankpilot::cli::main());
}
