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
//! - [`embedder`]: one loaded model = its preprocessor + a model replica, used
//!   synchronously (CLI, parity tests); owns L2 normalisation.
//! - [`config`]: layered configuration (defaults, file, environment, flags).
//! - [`batching`]: per-model bounded queue, batch selection, request re-assembly.
//! - [`worker`]: one OS thread per device owning a model replica.
//! - [`http`]: the axum router, request parsing, errors, auth.
//! - [`metrics`]: the Prometheus registry with the contract's metric names.
//! - [`app`]: wiring: loading models in the background, readiness, shutdown.

pub mod app;
pub mod batching;
pub mod config;
pub mod embedder;
pub mod http;
pub mod input;
pub mod metrics;
pub mod models;
pub mod preprocess;
mod simd;
pub mod worker;
