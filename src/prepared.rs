//! Statements prepared once per backend and kept (SPI_keepplan): parsing
//! and planning a statement costs more than running it. Used by the cache's
//! loads and by the SQL paths of metering.

use crate::error::FluxResult;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    static KEPT: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

/// A statement prepared once per backend and kept, looked up by its text.
/// Kept for the backend's life: PostgreSQL's plan cache re-plans it when a
/// table it reads changes (even dropped and created again).
pub fn kept(
    c: &SpiClient,
    sql: &'static str,
    args: &[PgOid],
    mutating: bool,
) -> FluxResult<Rc<OwnedPreparedStatement>> {
    if let Some(p) = KEPT.with(|k| k.borrow().get(sql).cloned()) {
        return Ok(p);
    }
    let p = if mutating {
        c.prepare_mut(sql, args)?
    } else {
        c.prepare(sql, args)?
    };
    let p = Rc::new(p.keep());
    KEPT.with(|k| k.borrow_mut().insert(sql, p.clone()));
    Ok(p)
}

/// How many statements are kept (the list of caches in cache/mod.rs).
pub fn count() -> usize {
    KEPT.with(|k| k.borrow().len())
}
