//! PKCS#11 3.2 identifiers that `cryptoki-sys` 0.4 (a 3.0 binding) does not define, shared
//! by the module and the crypto domain. Values from the OASIS PKCS#11 3.2 headers,
//! `published/3-02/pkcs11t.h` of <https://github.com/oasis-tcs/pkcs11> (Committee
//! Specification, 2025); the line of each group is cited.

// pkcs11t.h 3.2, key types (l. 439-440).
/// CKK_ML_KEM (FIPS 203).
pub const CKK_ML_KEM: u64 = 0x0000_0049;
/// CKK_ML_DSA (FIPS 204).
pub const CKK_ML_DSA: u64 = 0x0000_004a;

// pkcs11t.h 3.2, attributes (l. 643, 658-659, 668-669, 674).
/// CKA_PARAMETER_SET (CK_ULONG: a CKP_ML_DSA_* or CKP_ML_KEM_* value).
pub const CKA_PARAMETER_SET: u64 = 0x0000_061d;
/// CKA_ENCAPSULATE_TEMPLATE (attribute array; not supported here).
pub const CKA_ENCAPSULATE_TEMPLATE: u64 = 0x0000_062a;
/// CKA_DECAPSULATE_TEMPLATE (attribute array; not supported here).
pub const CKA_DECAPSULATE_TEMPLATE: u64 = 0x0000_062b;
/// CKA_ENCAPSULATE (CK_BBOOL: the public key may encapsulate).
pub const CKA_ENCAPSULATE: u64 = 0x0000_0633;
/// CKA_DECAPSULATE (CK_BBOOL: the private key may decapsulate).
pub const CKA_DECAPSULATE: u64 = 0x0000_0634;
/// CKA_SEED (the FIPS 203/204 key generation seed).
pub const CKA_SEED: u64 = 0x0000_0637;

// pkcs11t.h 3.2, mechanisms (l. 1216-1231).
/// CKM_ML_KEM_KEY_PAIR_GEN.
pub const CKM_ML_KEM_KEY_PAIR_GEN: u64 = 0x0000_000f;
/// CKM_ML_KEM (encapsulate / decapsulate).
pub const CKM_ML_KEM: u64 = 0x0000_0017;
/// CKM_ML_DSA_KEY_PAIR_GEN.
pub const CKM_ML_DSA_KEY_PAIR_GEN: u64 = 0x0000_001c;
/// CKM_ML_DSA (pure ML-DSA, optional CK_SIGN_ADDITIONAL_CONTEXT).
pub const CKM_ML_DSA: u64 = 0x0000_001d;
/// CKM_HASH_ML_DSA (HashML-DSA; not served: aws-lc-rs has no pre-hash ML-DSA).
pub const CKM_HASH_ML_DSA: u64 = 0x0000_001f;

// pkcs11t.h 3.2, mechanism info flags (l. 1314-1315).
/// CKF_ENCAPSULATE.
pub const CKF_ENCAPSULATE: u64 = 0x1000_0000;
/// CKF_DECAPSULATE.
pub const CKF_DECAPSULATE: u64 = 0x2000_0000;

// pkcs11t.h 3.2, return value (l. 1455).
/// CKR_PARAMETER_SET_NOT_SUPPORTED.
pub const CKR_PARAMETER_SET_NOT_SUPPORTED: u64 = 0x0000_0209;

// pkcs11t.h 3.2, CK_HEDGE_TYPE (l. 2703-2706).
/// CKH_HEDGE_PREFERRED.
pub const CKH_HEDGE_PREFERRED: u64 = 0;
/// CKH_HEDGE_REQUIRED.
pub const CKH_HEDGE_REQUIRED: u64 = 1;
/// CKH_DETERMINISTIC_REQUIRED.
pub const CKH_DETERMINISTIC_REQUIRED: u64 = 2;

// pkcs11t.h 3.2, parameter sets (l. 2724-2726, 2745-2747).
/// CKP_ML_DSA_44.
pub const CKP_ML_DSA_44: u64 = 1;
/// CKP_ML_DSA_65.
pub const CKP_ML_DSA_65: u64 = 2;
/// CKP_ML_DSA_87.
pub const CKP_ML_DSA_87: u64 = 3;
/// CKP_ML_KEM_512.
pub const CKP_ML_KEM_512: u64 = 1;
/// CKP_ML_KEM_768.
pub const CKP_ML_KEM_768: u64 = 2;
/// CKP_ML_KEM_1024.
pub const CKP_ML_KEM_1024: u64 = 3;
