//! vlembed: serves the BGE-VL vision-language embedding models.
//!
//! Data flows one way through the modules:
//!
//! ```text
//! request ─▶ http ─▶ preprocess ─▶ batching (queue) ─▶ worker ─▶ models ─▶ response
//! ```
//!
//! - [`input`]: plain domain types for what a client asks to embed.
//! - [`preprocess`]: image decoding/resizing and tokenization into [`preprocess::Prepared`].
//! - [`models`]: candle model code and model loading (Hub id or local directory).
//! - [`embedder`]: one loaded model = its preprocessor + a model replica, with the
//!   post-processing (composition, normalisation) shared by every front end.

pub mod app;
pub mod batching;
pub mod config;
pub mod embedder;
pub mod http;
pub mod input;
pub mod metrics;
pub mod models;
pub mod preprocess;
pub mod worker;
