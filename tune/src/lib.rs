//! LoRA fine-tuning for rankpilot, on libtorch (tch).
//!
//! - [`model`]: Llama-architecture decoders read from a Hugging Face directory (`config.json` +
//!   safetensors); the forward pass apart from the weight loading.
//! - [`lora`]: dynamic-rank LoRA sites (grow, QR-core squeeze), their AdamW and importance.
//! - [`adalora`]: AdaLoRA as PEFT implements it (SVD-form sites, masking rank allocator).
//! - [`svd`]: QR-core and randomized SVD.
//! - [`finetune`]: the training step, signals for schedulers, resizing to a rank plan.
//! - [`peft`]: PEFT adapter import and export.
//! - [`data`]: corpora, tokenizers and batches.
//! - [`inference`]: loss and perplexity of a token stream; generation.
//! - [`testing`]: tiny deterministic runs for tests.
//!
//! It builds and tests without the environments and the policies: nothing here knows what
//! decides a rank plan.

pub mod adalora;
pub mod data;
pub mod finetune;
pub mod inference;
pub mod lora;
pub mod model;
pub mod peft;
pub mod svd;
pub mod testing;
