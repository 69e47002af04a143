//! Text for pre-training and fine-tuning: corpora ([`corpus`]), tokenizers ([`tokenizer`]) and
//! batches ([`batches`]), one file each.

pub mod batches;
pub mod chat;
pub mod corpus;
pub mod tokenizer;

pub use batches::{Batch, TokenData, ValidationHalf, data_rng};
pub use chat::{ChatTemplate, Message};
pub use corpus::{BUILTIN_CODE, BUILTIN_PROSE, Corpus, Example, setup_venv};
pub use tokenizer::{HfTokenizer, Tokenizer};
