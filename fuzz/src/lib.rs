//! Decoder fuzzing lives in `tests/decoders.rs`; this crate has no code of its own (see `Cargo.toml`).
