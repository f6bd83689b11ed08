//! The caas key service.
