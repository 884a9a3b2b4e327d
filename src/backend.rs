//! Backend-local facts read on the hot path. These PostgreSQL functions only
//! read a variable and cannot raise an error, so they are called without
//! pgrx's guard: the guard is a sigsetjmp per call, and three of them were a
//! tenth of a warm check.

mod raw {
    extern "C" {
        pub fn IsInParallelMode() -> bool;
        pub fn GetCurrentTransactionStartTimestamp() -> i64;
        pub fn GetCurrentStatementStartTimestamp() -> i64;
    }
}

/// True inside a parallel query (leader or worker), where snapshots cannot
/// change.
pub fn in_parallel_mode() -> bool {
    // SAFETY: returns a field of the current transaction state; never raises.
    unsafe { raw::IsInParallelMode() }
}

/// True in a parallel worker process (started for one query).
pub fn is_parallel_worker() -> bool {
    // SAFETY: reads a backend-local integer (-1 outside parallel workers).
    unsafe { pgrx::pg_sys::ParallelWorkerNumber >= 0 }
}

/// The start of the current transaction (what now() returns).
pub fn transaction_start() -> i64 {
    // SAFETY: returns a backend-local variable; never raises.
    unsafe { raw::GetCurrentTransactionStartTimestamp() }
}

/// The start of the current client statement (statement_timestamp()).
pub fn statement_start() -> i64 {
    // SAFETY: returns a backend-local variable; never raises.
    unsafe { raw::GetCurrentStatementStartTimestamp() }
}

/// A text argument read in place. pgrx's `&str` argument detoasts through a
/// guarded call (a sigsetjmp each) even when the value is a plain inline
/// varlena, as every short id is; this reads those directly and leaves
/// compressed or out-of-line values to PostgreSQL.
#[derive(Clone, Copy)]
pub struct Text<'a>(&'a [u8]);

impl<'a> Text<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    /// The text as UTF-8 (what every text is in a UTF8 database).
    pub fn as_str(&self) -> crate::error::FluxResult<&'a str> {
        std::str::from_utf8(self.0).map_err(|_| {
            crate::error::FluxError::InvalidValue(format!(
                "argument {} is not valid UTF-8",
                crate::error::shown(&String::from_utf8_lossy(self.0))
            ))
        })
    }
}

impl Text<'_> {
    /// A text datum stored inline and uncompressed (every short id), read
    /// without any call into PostgreSQL; None for the other forms.
    ///
    /// # Safety
    /// `datum` is a non-null text datum that outlives the returned value.
    #[inline(always)]
    pub unsafe fn inline(datum: pgrx::pg_sys::Datum) -> Option<Self> {
        let p = datum.cast_mut_ptr::<pgrx::pg_sys::varlena>();
        // SAFETY: reads the varlena header as PostgreSQL's VARATT macros do.
        unsafe {
            if p.is_null() || pgrx::varlena::varatt_is_1b_e(p) || pgrx::varlena::varatt_is_4b_c(p) {
                return None;
            }
            let len = pgrx::varlena::varsize_any_exhdr(p);
            let data = pgrx::varlena::vardata_any(p).cast::<u8>();
            Some(Text(std::slice::from_raw_parts(data, len)))
        }
    }
}

impl pgrx::FromDatum for Text<'_> {
    unsafe fn from_polymorphic_datum(
        datum: pgrx::pg_sys::Datum,
        is_null: bool,
        _: pgrx::pg_sys::Oid,
    ) -> Option<Self> {
        if is_null || datum.is_null() {
            return None;
        }
        // SAFETY: a non-null text datum points at a varlena; a compressed or
        // out-of-line one is detoasted (a plain inline varlena) into the
        // function call's memory context, which outlives the call.
        unsafe {
            Text::inline(datum).or_else(|| {
                let p = datum.cast_mut_ptr::<pgrx::pg_sys::varlena>();
                Text::inline(pgrx::pg_sys::Datum::from(
                    pgrx::pg_sys::pg_detoast_datum_packed(p),
                ))
            })
        }
    }
}

// SAFETY: Text is read from a text datum, as `&str` is.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for Text<'fcx> {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the caller passes a text argument (the SQL signature).
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

pgrx::impl_sql_translatable!(Text<'_>, "text");

/// Read the fixed part of one catalog row through the syscache: `read` gets
/// the row's struct, and the row is released before returning. None when
/// there is no such row.
///
/// # Safety
/// Inside a transaction; `T` is the catalog struct of syscache `cache`.
pub unsafe fn syscache_row<T, R>(
    cache: pgrx::pg_sys::SysCacheIdentifier::Type,
    key: pgrx::pg_sys::Datum,
    read: impl FnOnce(&T) -> R,
) -> Option<R> {
    // SAFETY: per the function's contract; the struct is only borrowed
    // while the row is held.
    unsafe {
        let tup = pgrx::pg_sys::SearchSysCache1(cache as i32, key);
        if tup.is_null() {
            return None;
        }
        let r = read(&*pgrx::pg_sys::heap_tuple_get_struct::<T>(tup));
        pgrx::pg_sys::ReleaseSysCache(tup);
        Some(r)
    }
}
