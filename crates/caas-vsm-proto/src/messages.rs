//! The messages: one [`Request`] variant per forwarded PKCS#11 call and one [`Body`] shape
//! per kind of answer. Integers are PKCS#11 values widened to `u64`; attribute values are in
//! the canonical form of [`crate::attr`] (CK_ULONG as 8 bytes little-endian, CK_BBOOL as
//! one byte), so the module and the crypto domain need not share an ABI.

use crate::codec::{Blob, Secret};
use crate::{wire_enum, wire_struct};

/// Protocol version sent in [`Request::Hello`]. Version 2 added the single-round-trip
/// operations ([`Request::SignOnce`], [`Request::VerifyOnce`], [`Request::EncryptOnce`],
/// [`Request::DecryptOnce`]); a version-2 crypto domain still serves version-1 modules.
/// The PKCS#11 3.x calls ([`Request::EncapsulateKey`], [`Request::DecapsulateKey`],
/// [`Request::SessionCancel`], the message-based [`Request::MessageInit`],
/// [`Request::EncryptMessage`], [`Request::DecryptMessage`], [`Request::MessageFinal`] and
/// the `*MessageBegin`/`*MessageNext` requests) and
/// [`MechParam::SignContext`] came later without a version
/// bump (a module and its crypto domain ship together); a crypto domain that predates them
/// fails the call (the module reports CKR_DEVICE_ERROR) and keeps serving the rest.
pub const PROTOCOL_VERSION: u32 = 2;

/// Oldest module protocol version a crypto domain accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

wire_struct! {
    /// One attribute of a template, value in canonical form.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Attr {
        /// CKA_* type.
        pub ty: u64,
        /// Canonical value.
        pub value: Blob,
    }
}

wire_enum! {
    /// Mechanism parameters, parsed by the module from the C structures.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum MechParam {
        /// No parameter.
        None = 0 {},
        /// A plain byte-string parameter (an IV for CBC, an EdDSA context...).
        Bytes = 1 { data: Blob },
        /// CK_GCM_PARAMS.
        Gcm = 2 { iv: Blob, aad: Blob, tag_bits: u64 },
        /// CK_RSA_PKCS_PSS_PARAMS.
        Pss = 3 { hash: u64, mgf: u64, salt_len: u64 },
        /// CK_RSA_PKCS_OAEP_PARAMS.
        Oaep = 4 { hash: u64, mgf: u64, source: u64, source_data: Blob },
        /// CK_ECDH1_DERIVE_PARAMS.
        Ecdh = 5 { kdf: u64, shared_data: Blob, public_data: Blob },
        /// CK_MAC_GENERAL_PARAMS (the output length of a `*_GENERAL` MAC mechanism).
        MacLen = 6 { len: u64 },
        /// CK_AES_CTR_PARAMS: counter width in bits and the initial counter block.
        Ctr = 7 { counter_bits: u64, cb: Blob },
        /// CK_SIGN_ADDITIONAL_CONTEXT (PKCS#11 3.2, ML-DSA): hedging variant (CKH_*) and
        /// the FIPS 204 context string.
        SignContext = 8 { hedge: u64, context: Blob },
    }
}

wire_struct! {
    /// CK_GCM_MESSAGE_PARAMS (PKCS#11 3.0) of one C_EncryptMessage/C_DecryptMessage.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct GcmMessageParams {
        /// The IV (its leading `iv_fixed_bits` bits when the domain generates the rest;
        /// the length of this blob is `ulIvLen`).
        pub iv: Blob,
        /// ulIvFixedBits.
        pub iv_fixed_bits: u64,
        /// ivGenerator (CKG_*).
        pub generator: u64,
        /// The tag to check (decryption; empty when encrypting).
        pub tag: Blob,
        /// ulTagBits.
        pub tag_bits: u64,
    }
}

wire_struct! {
    /// CK_MECHANISM.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Mechanism {
        /// CKM_* type.
        pub mechanism: u64,
        /// Its parameter.
        pub param: MechParam,
    }
}

wire_struct! {
    /// CK_SLOT_INFO.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SlotInfo {
        /// Slot description (padded by the module).
        pub description: String,
        /// Manufacturer.
        pub manufacturer: String,
        /// CKF_* flags.
        pub flags: u64,
    }
}

wire_struct! {
    /// CK_TOKEN_INFO.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct TokenInfo {
        /// Token label.
        pub label: String,
        /// Manufacturer.
        pub manufacturer: String,
        /// Model.
        pub model: String,
        /// Serial number.
        pub serial: String,
        /// CKF_* flags.
        pub flags: u64,
        /// Maximum sessions (0 = effectively infinite per the module).
        pub max_sessions: u64,
        /// Open sessions.
        pub session_count: u64,
        /// Maximum R/W sessions.
        pub max_rw_sessions: u64,
        /// Open R/W sessions.
        pub rw_session_count: u64,
        /// Maximum PIN length.
        pub max_pin_len: u64,
        /// Minimum PIN length.
        pub min_pin_len: u64,
    }
}

wire_struct! {
    /// CK_MECHANISM_INFO.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct MechInfo {
        /// Minimum key size.
        pub min_key_size: u64,
        /// Maximum key size.
        pub max_key_size: u64,
        /// CKF_* flags.
        pub flags: u64,
    }
}

wire_struct! {
    /// CK_SESSION_INFO.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SessionInfo {
        /// Slot of the session.
        pub slot: u64,
        /// CKS_* state.
        pub state: u64,
        /// CKF_* flags.
        pub flags: u64,
    }
}

wire_enum! {
    /// The result for one attribute of a C_GetAttributeValue.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum AttrValue {
        /// The canonical value.
        Value = 0 { value: Blob },
        /// The attribute is sensitive or unextractable (CKR_ATTRIBUTE_SENSITIVE).
        Sensitive = 1 {},
        /// The object has no such attribute (CKR_ATTRIBUTE_TYPE_INVALID).
        Invalid = 2 {},
    }
}

wire_enum! {
    /// One call from the module to the crypto domain. `cap` fields carry the caller's output
    /// buffer size (`None`: the caller only asks for the length); the domain keeps the
    /// operation alive and answers [`Body::Len`] when the buffer is missing or too small.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request {
        /// First message of each connection: protocol version and the application instance
        /// (one `C_Initialize` of one process) this connection belongs to.
        Hello = 0 { version: u32, app: [u8; 16] },
        /// C_GetSlotList.
        GetSlotList = 1 { token_present: bool },
        /// C_GetSlotInfo.
        GetSlotInfo = 2 { slot: u64 },
        /// C_GetTokenInfo.
        GetTokenInfo = 3 { slot: u64 },
        /// C_GetMechanismList.
        GetMechanismList = 4 { slot: u64 },
        /// C_GetMechanismInfo.
        GetMechanismInfo = 5 { slot: u64, mechanism: u64 },
        /// C_InitToken.
        InitToken = 6 { slot: u64, so_pin: Secret, label: String },
        /// C_InitPIN.
        InitPin = 7 { session: u64, pin: Secret },
        /// C_SetPIN.
        SetPin = 8 { session: u64, old_pin: Secret, new_pin: Secret },
        /// C_OpenSession.
        OpenSession = 9 { slot: u64, flags: u64 },
        /// C_CloseSession.
        CloseSession = 10 { session: u64 },
        /// C_CloseAllSessions.
        CloseAllSessions = 11 { slot: u64 },
        /// C_GetSessionInfo.
        GetSessionInfo = 12 { session: u64 },
        /// C_Login.
        Login = 13 { session: u64, user_type: u64, pin: Secret },
        /// C_Logout.
        Logout = 14 { session: u64 },
        /// C_CreateObject.
        CreateObject = 15 { session: u64, template: Vec<Attr> },
        /// C_CopyObject.
        CopyObject = 16 { session: u64, object: u64, template: Vec<Attr> },
        /// C_DestroyObject.
        DestroyObject = 17 { session: u64, object: u64 },
        /// C_GetObjectSize.
        GetObjectSize = 18 { session: u64, object: u64 },
        /// C_GetAttributeValue.
        GetAttributeValue = 19 { session: u64, object: u64, types: Vec<u64> },
        /// C_SetAttributeValue.
        SetAttributeValue = 20 { session: u64, object: u64, template: Vec<Attr> },
        /// C_FindObjectsInit.
        FindObjectsInit = 21 { session: u64, template: Vec<Attr> },
        /// C_FindObjects.
        FindObjects = 22 { session: u64, max: u64 },
        /// C_FindObjectsFinal.
        FindObjectsFinal = 23 { session: u64 },
        /// C_EncryptInit.
        EncryptInit = 24 { session: u64, mechanism: Mechanism, key: u64 },
        /// C_Encrypt.
        Encrypt = 25 { session: u64, data: Blob, cap: Option<u64> },
        /// C_EncryptUpdate.
        EncryptUpdate = 26 { session: u64, data: Blob, cap: Option<u64> },
        /// C_EncryptFinal.
        EncryptFinal = 27 { session: u64, cap: Option<u64> },
        /// C_DecryptInit.
        DecryptInit = 28 { session: u64, mechanism: Mechanism, key: u64 },
        /// C_Decrypt.
        Decrypt = 29 { session: u64, data: Blob, cap: Option<u64> },
        /// C_DecryptUpdate.
        DecryptUpdate = 30 { session: u64, data: Blob, cap: Option<u64> },
        /// C_DecryptFinal.
        DecryptFinal = 31 { session: u64, cap: Option<u64> },
        /// C_DigestInit.
        DigestInit = 32 { session: u64, mechanism: Mechanism },
        /// C_Digest.
        Digest = 33 { session: u64, data: Blob, cap: Option<u64> },
        /// C_DigestUpdate.
        DigestUpdate = 34 { session: u64, data: Blob },
        /// C_DigestKey.
        DigestKey = 35 { session: u64, key: u64 },
        /// C_DigestFinal.
        DigestFinal = 36 { session: u64, cap: Option<u64> },
        /// C_SignInit.
        SignInit = 37 { session: u64, mechanism: Mechanism, key: u64 },
        /// C_Sign.
        Sign = 38 { session: u64, data: Blob, cap: Option<u64> },
        /// C_SignUpdate.
        SignUpdate = 39 { session: u64, data: Blob },
        /// C_SignFinal.
        SignFinal = 40 { session: u64, cap: Option<u64> },
        /// C_VerifyInit.
        VerifyInit = 41 { session: u64, mechanism: Mechanism, key: u64 },
        /// C_Verify.
        Verify = 42 { session: u64, data: Blob, signature: Blob },
        /// C_VerifyUpdate.
        VerifyUpdate = 43 { session: u64, data: Blob },
        /// C_VerifyFinal.
        VerifyFinal = 44 { session: u64, signature: Blob },
        /// C_GenerateKey.
        GenerateKey = 45 { session: u64, mechanism: Mechanism, template: Vec<Attr> },
        /// C_GenerateKeyPair.
        GenerateKeyPair = 46 {
            session: u64,
            mechanism: Mechanism,
            public_template: Vec<Attr>,
            private_template: Vec<Attr>,
        },
        /// C_WrapKey.
        WrapKey = 47 { session: u64, mechanism: Mechanism, wrapping_key: u64, key: u64, cap: Option<u64> },
        /// C_UnwrapKey.
        UnwrapKey = 48 { session: u64, mechanism: Mechanism, unwrapping_key: u64, wrapped: Blob, template: Vec<Attr> },
        /// C_DeriveKey.
        DeriveKey = 49 { session: u64, mechanism: Mechanism, base_key: u64, template: Vec<Attr> },
        /// C_SeedRandom.
        SeedRandom = 50 { session: u64, seed: Blob },
        /// C_GenerateRandom.
        GenerateRandom = 51 { session: u64, len: u64 },
        /// C_SignInit + C_Sign in one round trip (v2): the module recorded the C_SignInit
        /// locally. The domain runs every C_SignInit check, counts and audits the key use,
        /// signs and answers the whole signature ([`Body::Data`]); the module implements the
        /// length-query protocol with it. No operation state is kept in the session.
        SignOnce = 52 { session: u64, mechanism: Mechanism, key: u64, data: Blob },
        /// C_VerifyInit + C_Verify in one round trip (v2).
        VerifyOnce = 53 { session: u64, mechanism: Mechanism, key: u64, data: Blob, signature: Blob },
        /// C_EncryptInit + C_Encrypt in one round trip (v2); answers [`Body::Data`].
        EncryptOnce = 54 { session: u64, mechanism: Mechanism, key: u64, data: Blob },
        /// C_DecryptInit + C_Decrypt in one round trip (v2); answers [`Body::SecretData`].
        DecryptOnce = 55 { session: u64, mechanism: Mechanism, key: u64, data: Blob },
        /// C_EncapsulateKey (PKCS#11 3.2): encapsulates a fresh secret to `public_key`
        /// and keeps it as a new secret key made from `template`. With `cap` `None` or too
        /// small the domain answers [`Body::Len`] (the ciphertext length) and creates
        /// nothing; otherwise [`Body::Encapsulated`].
        EncapsulateKey = 56 { session: u64, mechanism: Mechanism, public_key: u64, template: Vec<Attr>, cap: Option<u64> },
        /// C_DecapsulateKey (PKCS#11 3.2): answers [`Body::Ulong`], the new key's handle.
        DecapsulateKey = 57 { session: u64, mechanism: Mechanism, private_key: u64, template: Vec<Attr>, ciphertext: Blob },
        /// C_SessionCancel (PKCS#11 3.0): ends the session's active operations named by
        /// `flags` (CKF_ENCRYPT, CKF_DECRYPT, CKF_DIGEST, CKF_SIGN, CKF_VERIFY, CKF_FIND_OBJECTS).
        SessionCancel = 58 { session: u64, flags: u64 },
        /// C_MessageEncryptInit (`encrypt`) or C_MessageDecryptInit (PKCS#11 3.0 §5.19).
        MessageInit = 59 { session: u64, mechanism: Mechanism, key: u64, encrypt: bool },
        /// C_EncryptMessage (single part): `params` per message, the IV generated by the
        /// domain unless `CKG_NO_GENERATE`. With `cap` `None` or too small the domain
        /// answers [`Body::Len`] and neither counts a use nor spends an IV; otherwise
        /// [`Body::Sealed`].
        EncryptMessage = 60 { session: u64, params: GcmMessageParams, aad: Blob, data: Blob, cap: Option<u64> },
        /// C_DecryptMessage (single part): answers [`Body::Len`] or [`Body::SecretData`].
        DecryptMessage = 61 { session: u64, params: GcmMessageParams, aad: Blob, data: Blob, cap: Option<u64> },
        /// C_MessageEncryptFinal (`encrypt`) or C_MessageDecryptFinal.
        MessageFinal = 62 { session: u64, encrypt: bool },
        /// C_EncryptMessageBegin: starts a multi-part message; the domain generates the IV
        /// now (unless `CKG_NO_GENERATE`) and answers it in [`Body::Sealed`] (empty tag and
        /// data).
        EncryptMessageBegin = 63 { session: u64, params: GcmMessageParams, aad: Blob },
        /// C_EncryptMessageNext: a part of the message; the domain buffers the parts and
        /// answers the whole ciphertext and the tag ([`Body::Sealed`]) at the part with
        /// `end` (CKF_END_OF_MESSAGE), empty [`Body::Data`] before. `cap` as for
        /// [`Request::EncryptMessage`]; a length query buffers nothing.
        EncryptMessageNext = 64 { session: u64, data: Blob, end: bool, cap: Option<u64> },
        /// C_DecryptMessageBegin: the IV of a multi-part message to decrypt.
        DecryptMessageBegin = 65 { session: u64, params: GcmMessageParams, aad: Blob },
        /// C_DecryptMessageNext: a part; at `end` the tag (from that call's parameters) is
        /// checked before any plaintext is answered ([`Body::SecretData`]).
        DecryptMessageNext = 66 { session: u64, data: Blob, tag: Blob, end: bool, cap: Option<u64> },
        /// Moves the rest of this UNIX-socket connection onto a shared-memory ring
        /// ([`crate::ring`]): the domain answers [`Body::Empty`] with the ring's memfd attached
        /// (SCM_RIGHTS), and every later frame of the connection travels through the ring.
        /// Other transports, and a ring asked for twice, are refused
        /// (CKR_FUNCTION_NOT_SUPPORTED); the module then stays on the socket.
        RingOpen = 67 {},
    }
}

wire_enum! {
    /// The payload of a [`Response`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Body {
        /// Nothing beyond the return value.
        Empty = 0 {},
        /// One integer (a handle, a size).
        Ulong = 1 { value: u64 },
        /// A list of integers (slots, mechanisms, handles).
        Ulongs = 2 { values: Vec<u64> },
        /// Output data (ciphertext, signature, digest, wrapped key).
        Data = 3 { data: Blob },
        /// Secret output (plaintext, random bytes).
        SecretData = 4 { data: Secret },
        /// The output length when the caller's buffer was missing or too small.
        Len = 5 { len: u64 },
        /// C_GetSlotInfo.
        Slot = 6 { info: SlotInfo },
        /// C_GetTokenInfo.
        Token = 7 { info: TokenInfo },
        /// C_GetMechanismInfo.
        Mech = 8 { info: MechInfo },
        /// C_GetSessionInfo.
        Session = 9 { info: SessionInfo },
        /// C_GetAttributeValue: one entry per requested type.
        Attrs = 10 { values: Vec<AttrValue> },
        /// C_GenerateKeyPair.
        KeyPair = 11 { public: u64, private: u64 },
        /// C_EncapsulateKey: the ciphertext and the new key's handle.
        Encapsulated = 12 { ciphertext: Blob, key: u64 },
        /// C_EncryptMessage: the IV used (generated or given), the tag and the ciphertext.
        Sealed = 13 { iv: Blob, tag: Blob, data: Blob },
    }
}

wire_struct! {
    /// The answer to one [`Request`]: a CK_RV and a body.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Response {
        /// CKR_* return value.
        pub rv: u64,
        /// Payload; [`Body::Empty`] on most errors.
        pub body: Body,
    }
}

impl Response {
    /// A response carrying only a return value.
    #[must_use]
    pub fn rv(rv: u64) -> Self {
        Self {
            rv,
            body: Body::Empty {},
        }
    }

    /// A successful response (CKR_OK) with `body`.
    #[must_use]
    pub fn ok(body: Body) -> Self {
        Self { rv: 0, body }
    }
}
