//! Model architectures, one per file, their Hugging Face `config.json`, weight files, and the
//! projections LoRA sites sit on.

pub mod config;
pub mod llama;
pub mod projection;
pub mod weights;

pub use projection::{Projection, Target};
