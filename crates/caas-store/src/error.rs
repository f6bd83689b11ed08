//! The storage error type: what failed and why, without ever echoing a stored body, a
//! connection password or other secret text.

/// Everything that can go wrong in `caas-store`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An optimistic-concurrency expectation (`expect_rev`) of a batch failed; nothing of that
    /// batch was applied.
    #[error("conflict on {kind} {id}: the object changed or does not have the expected revision")]
    Conflict {
        /// Object kind of the first write whose expectation failed.
        kind: String,
        /// Object id of the first write whose expectation failed.
        id: String,
    },
    /// The database backend reported an error.
    #[error("storage backend error while {context}: {message}")]
    Backend {
        /// What the store was doing.
        context: &'static str,
        /// The backend's error text (never contains stored bodies).
        message: String,
    },
    /// Data read from the database is not what this code writes (tampering, bit rot or a
    /// foreign schema).
    #[error("corrupt storage data: {0}")]
    Corrupt(String),
    /// A stored object row failed its integrity check (its MAC does not cover its kind,
    /// account, id, revision and body): it was edited, copied, swapped or re-pointed outside
    /// the key service. The row is never returned. Names the row, never its content.
    #[error(
        "integrity check failed for stored {kind} record {id} of account {account}: the row was changed outside the key service"
    )]
    Integrity {
        /// Object kind of the refused row.
        kind: String,
        /// Account of the refused row.
        account: String,
        /// Id of the refused row.
        id: String,
    },
    /// The database was created by an incompatible version of caas.
    #[error("unsupported storage schema version {found} (this build supports {supported})")]
    SchemaVersion {
        /// The version found in the database.
        found: String,
        /// The version this build writes.
        supported: &'static str,
    },
    /// The storage URL could not be understood.
    #[error("invalid storage URL: {0}")]
    InvalidUrl(String),
    /// A value handed to the store cannot be stored (for example a NUL character in a text field).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The background writer of this store has stopped (the store is shutting down or the
    /// writer thread failed).
    #[error("storage writer has stopped")]
    WriterStopped,
}

impl Error {
    pub(crate) fn sqlite(context: &'static str, e: rusqlite::Error) -> Self {
        Error::Backend {
            context,
            message: e.to_string(),
        }
    }

    pub(crate) fn postgres(context: &'static str, e: tokio_postgres::Error) -> Self {
        // tokio-postgres' Display prints only "db error"; include the server's message.
        let message = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        Error::Backend { context, message }
    }
}
