//! Run I/O for rankpilot: what every run leaves on disk.
//!
//! - [`checkpoint`]: safetensors weights plus JSON metadata, written atomically, resumable, and
//!   the atomic safetensors writer that PEFT adapters and models share.
//! - [`tensorboard`]: a TensorBoard event-file writer (scalars, histograms, images, text) and the
//!   rank-heatmap picture.
//!
//! It depends on tch only for the tensor type; nothing here knows about environments, policies
//! or models.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod tensorboard;
