//! One error type for the extension, each variant mapped to an explicit
//! SQLSTATE so callers can branch on it (never the catch-all XX000 / 22000).

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum FluxError {
    /// A value outside what is accepted: 22023 invalid_parameter_value.
    #[error("{0}")]
    InvalidValue(String),
    /// A reference to something that does not exist: 23503 foreign_key_violation.
    #[error("{0}")]
    UnknownReference(String),
    /// Refused because other rows still depend on it: 23503.
    #[error("{0}")]
    InUse(String),
    /// A uniqueness rule (e.g. one default plan): 23505 unique_violation.
    #[error("{0}")]
    Conflict(String),
    /// A row would take a tenant past its limit: 23P01 (an integrity
    /// violation, like an exclusion constraint's).
    #[error("{0}")]
    LimitExceeded(String),
    /// A write on a read-only connection (hot standby, READ ONLY
    /// transaction): 25006.
    #[error("{0}")]
    ReadOnly(String),
    /// A credential that does not authenticate: 28000.
    #[error("{0}")]
    Unauthorized(String),
    /// A date or interval setting that does not parse: 22007.
    #[error("{0}")]
    BadDatetime(String),
    /// The caller may not do this (act for another tenant, set flux.now):
    /// 42501 insufficient_privilege.
    #[error("{0}")]
    Forbidden(String),
    /// Text that is not valid in the database encoding: 22021
    /// character_not_in_repertoire.
    #[error("{0}")]
    BadEncoding(String),
    /// A flux table or column no longer has the type flux expects (someone
    /// altered it): 42804 datatype_mismatch.
    #[error("{0}")]
    WrongType(String),
    /// The installation is not in a state flux can run in (the schema owned
    /// by a superuser after a binary upgrade without ALTER EXTENSION UPDATE):
    /// 55000 object_not_in_prerequisite_state.
    #[error("{0}")]
    NotReady(String),
    /// A database error we did not expect; reported with its own text.
    #[error("internal error in flux_entitlements: {0}")]
    Internal(String),
}

impl FluxError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            FluxError::InvalidValue(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            FluxError::UnknownReference(_) | FluxError::InUse(_) => {
                PgSqlErrorCode::ERRCODE_FOREIGN_KEY_VIOLATION
            }
            FluxError::Conflict(_) => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
            FluxError::LimitExceeded(_) => PgSqlErrorCode::ERRCODE_EXCLUSION_VIOLATION,
            FluxError::ReadOnly(_) => PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            FluxError::Unauthorized(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION
            }
            FluxError::BadDatetime(_) => PgSqlErrorCode::ERRCODE_INVALID_DATETIME_FORMAT,
            FluxError::Forbidden(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            FluxError::BadEncoding(_) => PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            FluxError::WrongType(_) => PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            FluxError::NotReady(_) => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            FluxError::Internal(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }

    /// Raise as a PostgreSQL ERROR with this variant's SQLSTATE.
    pub fn raise(self) -> ! {
        let code = self.sqlstate();
        ErrorReport::new(code, self.to_string(), "flux_entitlements").report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<pgrx::spi::SpiError> for FluxError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        FluxError::Internal(e.to_string())
    }
}

pub type FluxResult<T> = Result<T, FluxError>;

/// Unwrap a result or raise the error with its SQLSTATE.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for FluxResult<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

/// Quote a user-supplied value for a message, cut to a readable length so a
/// 1 MB key never turns into a 1 MB error message.
pub fn shown(value: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::with_capacity(value.len().min(MAX) + 8);
    out.push('"');
    if value.chars().count() > MAX {
        out.extend(value.chars().take(MAX));
        out.push_str("...");
    } else {
        out.push_str(value);
    }
    out.push('"');
    out
}
