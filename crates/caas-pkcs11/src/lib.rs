//! libcaas_pkcs11.
