//! Links libcaas_pkcs11.so with `-z nodelete`: applications (and the `cryptoki` crate)
//! dlclose the module after C_Finalize, but thread-local destructors registered by the
//! Rust runtime inside it may still run at a later thread exit; keeping the code mapped
//! makes that safe instead of a crash in the host process.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
}
