//! rankpilot: a rank-allocation controller for LoRA fine-tuning.
//!
//! This crate holds the part that joins the others: rank schedulers ([`scheduler`]: fixed,
//! AdaLoRA, LoRA-Squeeze, a trained policy) and the controller ([`controller`]) that runs one
//! fine-tuning loop under a scheduler beside a simulated resource — an observation in, a rank
//! plan out, adapters resized, logs written. The other concerns live in their own crates:
//! `envs` (simulated environments, no libtorch), `policies` (PPO, DDIM, the prior), `tune`
//! (models, LoRA sites, SVD, the training step, PEFT I/O, corpora and tokenizers), `runio`
//! (checkpoints and TensorBoard) and `rankpilot-config` (strict presets, bad-input errors). The
//! command-line interface is private to the `rankpilot` binary.

pub mod controller;
pub mod scheduler;
