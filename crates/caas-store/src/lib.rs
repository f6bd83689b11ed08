//! Key-service storage.
