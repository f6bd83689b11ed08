//! Shared cryptographic building blocks of caas.
