//! rankpilot: a rank-allocation controller for LoRA fine-tuning.
//!
//! This crate is the controller: the CLI ([`cli`]), TensorBoard logging ([`tensorboard`]),
//! checkpoints ([`checkpoint`]) and device selection ([`device`]); the fine-tuning side: a Llama
//! decoder ([`model::llama`]), corpora and tokenizers ([`data`]), dynamic-rank LoRA sites
//! ([`lora`]), QR-core and randomized SVD ([`svd`]), the training loop ([`finetune`]) and PEFT
//! adapter import/export ([`peft`]); rank schedulers ([`scheduler`]) and the controller that lets
//! them steer a real run beside a simulated resource ([`controller`]). The simulated environments live in the `envs` crate, the
//! policies in the `policies` crate.

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod controller;
pub mod data;
pub mod device;
pub mod finetune;
pub mod lora;
pub mod model;
pub mod peft;
pub mod scheduler;
pub mod svd;
pub mod tensorboard;
