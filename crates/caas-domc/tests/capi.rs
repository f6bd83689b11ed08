//! Bad input through the C API: builds `capi.c` (a plain C PKCS#11 application using the
//! p11-kit header) and runs it against libcaas_pkcs11.so and a live crypto domain.

mod common;

use anyhow::{Result, ensure};
use common::*;
use std::process::Command;

/// Builds `tests/NAME.c` (a plain C PKCS#11 application using the p11-kit header), runs it
/// against libcaas_pkcs11.so and a live crypto domain, and requires its success line.
fn run_c_checks(name: &str, passed: &str) -> Result<()> {
    require("cc", "build-essential")?;
    require_file("/usr/include/p11-kit-1/p11-kit/pkcs11.h", "libp11-kit-dev")?;
    let dom = Dom::start_initialised(name, &[])?;
    let work = tempfile::tempdir()?;
    let exe = work.path().join(name);
    ok(Command::new("cc")
        .args(["-Wall", "-O1", "-I/usr/include/p11-kit-1", "-o"])
        .arg(&exe)
        .arg(format!("{}/tests/{name}.c", env!("CARGO_MANIFEST_DIR")))
        .arg("-ldl"))?;
    let out = run(Command::new(&exe)
        .arg(module()?)
        .arg(USER_PIN)
        .env("CAAS_PKCS11_SOCKET", &dom.socket))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    ensure!(
        out.status.success() && text.contains(passed),
        "{name} failed:\n{text}"
    );
    Ok(())
}

#[test]
fn c_api_rejects_bad_input_with_the_specified_return_values() -> Result<()> {
    run_c_checks("capi", "all C-API checks passed")
}

/// A forked child of an application using the module (`fork_child.c`): the child is refused
/// the parent's connections and sessions (CKR_CRYPTOKI_NOT_INITIALIZED, the fused signing
/// path included) until it calls `C_Initialize`, then works on its own pool; the parent keeps
/// signing on its pool; a `fork()` after `C_Finalize` and `dlclose` still works. The module
/// tells parent from child by a `pthread_atfork` handler (no `getpid` per call).
#[test]
fn a_forked_child_is_refused_the_parents_pool_until_it_initializes() -> Result<()> {
    run_c_checks("fork_child", "all fork checks passed")
}
