//! The `cryptoki` side of the end-to-end tests: a module context, a logged-in user
//! session, and PKCS#11 return-value checks.

use super::{USER_PIN, module};
use anyhow::{Context as _, Result, ensure};
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

/// Loads and initialises `libcaas_pkcs11.so` (OS threads).
pub fn context() -> Result<Pkcs11> {
    let p = Pkcs11::new(module()?)?;
    p.initialize(CInitializeArgs::OsThreads)?;
    Ok(p)
}

/// The PKCS#11 return value of an error, if it is one.
pub fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Fails unless `r` is the PKCS#11 error `want`.
pub fn expect_rv<T: std::fmt::Debug>(
    r: cryptoki::error::Result<T>,
    want: RvError,
    what: &str,
) -> Result<()> {
    let e = r.err();
    ensure!(
        e.as_ref().and_then(rv) == Some(want),
        "{what}: want {want:?}, got {e:?}"
    );
    Ok(())
}

/// A read-write session on the first token, logged in as the user.
pub fn user_session(p: &Pkcs11) -> Result<Session> {
    let slot = p.get_slots_with_token()?[0];
    let s = p.open_rw_session(slot)?;
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))?;
    Ok(s)
}

/// Hex → bytes.
pub fn h(s: &str) -> Result<Vec<u8>> {
    hex::decode(s).context("hex")
}
