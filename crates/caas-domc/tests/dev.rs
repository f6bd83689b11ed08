//! The `caas dev` hook: starting a dev crypto domain initialises its token, reports the
//! `CAAS_PKCS11_*` variables, the demo step signs inside the token, and a restart on the same
//! directory keeps the token and PINs.

use anyhow::{Result, ensure};
use std::path::Path;

#[test]
fn dev_domain_starts_initialised_and_the_demo_step_signs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exe = Path::new(env!("CARGO_BIN_EXE_caas-domc"));
    let mut dev = caas_domc::dev::start(dir.path(), exe)?;
    let env = dev.env();
    for k in [
        "CAAS_PKCS11_MODULE",
        "CAAS_PKCS11_SOCKET",
        "CAAS_PKCS11_TOKEN_LABEL",
        "CAAS_PKCS11_USER_PIN",
        "CAAS_PKCS11_SO_PIN",
    ] {
        ensure!(
            env.iter().any(|(n, v)| n == k && !v.is_empty()),
            "{k} missing in {:?}",
            env.iter().map(|e| &e.0).collect::<Vec<_>>()
        );
    }
    let summary = caas_domc::dev::demo_sign(&dev.socket, &dev.user_pin)?;
    ensure!(summary.contains("verified"), "{summary}");
    let pins = (dev.so_pin.clone(), dev.user_pin.clone());
    dev.stop();
    let mut again = caas_domc::dev::start(dir.path(), exe)?;
    ensure!(
        (again.so_pin.clone(), again.user_pin.clone()) == pins,
        "PINs changed across restart"
    );
    caas_domc::dev::demo_sign(&again.socket, &again.user_pin)?;
    again.stop();
    Ok(())
}
