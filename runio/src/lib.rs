//! Run I/O for rankpilot: what every run leaves on disk.
//!
//! - [`checkpoint`]: safetensors weights plus JSON metadata, written atomically, resumable, and
//!   the atomic safetensors writer that PEFT adapters and models share.
//! - [`tensorboard`]: a TensorBoard event-file writer (scalars, histograms, images, text) and the
//!   rank-heatmap picture.
//! - [`figures`]: labelled figures (rank maps, loss curves, resource spent) drawn with `plotters`.
//!
//! It depends on tch only for the tensor type; nothing here knows about environments, policies
//! or models.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod figures;
pub mod tensorboard;
