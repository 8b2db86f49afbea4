//! The celeriac worker.

pub mod tasks;
