//! Entry points that released install scripts declare but this version no
//! longer uses. `CREATE FUNCTION ... LANGUAGE c` looks its symbol up, so
//! without them the 0.1.0 script (the first step of the upgrade walk, and
//! any database restored from 0.1.0 before ALTER EXTENSION UPDATE) would not
//! load against this library. Calling one says what to do instead.

use pgrx::pg_sys;

macro_rules! removed {
    ($finfo:ident, $symbol:ident, $what:literal) => {
        #[doc(hidden)]
        #[no_mangle]
        pub extern "C" fn $finfo() -> &'static pg_sys::Pg_finfo_record {
            const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }

        /// # Safety
        /// Called by PostgreSQL's function manager; raises at once.
        #[doc(hidden)]
        #[no_mangle]
        #[pgrx::pg_guard]
        pub unsafe extern "C-unwind" fn $symbol(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
            crate::error::FluxError::NotReady(concat!(
                $what,
                " was removed in flux_entitlements 0.2.0: run ALTER EXTENSION flux_entitlements UPDATE"
            ).into())
            .raise()
        }
    };
}

removed!(
    pg_finfo__value_wrapper,
    _value_wrapper,
    "flux._value (0.1.0's body of flux_value)"
);
removed!(
    pg_finfo__check_row_limit_wrapper,
    _check_row_limit_wrapper,
    "flux._check_row_limit (0.1.0's row count of flux_enforce_limit)"
);
