//! One module per subcommand: its clap arguments and its `run` function.

pub mod act;
pub mod bench;
pub mod bench_ppo;
pub mod calibrate;
pub mod common;
pub mod compare;
pub mod doctor;
pub mod eval;
pub mod evaluate;
pub mod finetune;
pub mod peers;
pub mod pretrain;
pub mod squeeze;
pub mod train;
