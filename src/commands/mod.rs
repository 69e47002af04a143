//! One module per subcommand: its clap arguments and its `run` function.

pub mod doctor;
pub mod eval;
pub mod train;
