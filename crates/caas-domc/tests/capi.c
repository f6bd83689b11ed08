/* C-API conformance checks of libcaas_pkcs11.so for bad input: NULL pointers, the
 * CKR_BUFFER_TOO_SMALL length-query protocol, bad handles and bad templates. Built and run
 * by capi.rs; exits non-zero on the first unexpected return value.
 * Usage: capi MODULE USER_PIN */
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <p11-kit/pkcs11.h>

/* PKCS#11 3.0 interface types (not in every distribution's header). */
typedef struct { CK_CHAR_PTR pInterfaceName; CK_VOID_PTR pFunctionList; CK_FLAGS flags; } IFACE;
typedef CK_RV (*GET_IFACE)(CK_UTF8CHAR_PTR, CK_VERSION_PTR, IFACE **, CK_FLAGS);

static int failures = 0;
#define EXPECT(call, want) do { CK_RV rv_ = (call); if (rv_ != (CK_RV)(want)) { \
    fprintf(stderr, "FAIL line %d: %s returned 0x%lx, expected 0x%lx\n", __LINE__, #call, \
            (unsigned long)rv_, (unsigned long)(want)); failures++; } else { \
    printf("ok: %s -> 0x%lx\n", #call, (unsigned long)rv_); } } while (0)
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond); failures++; } \
    else { printf("ok: %s\n", #cond); } } while (0)

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: capi MODULE PIN\n"); return 2; }
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    GET_IFACE gi = (GET_IFACE)dlsym(h, "C_GetInterface");
    if (!gfl || !gi) { fprintf(stderr, "missing exports\n"); return 2; }
    CK_FUNCTION_LIST_PTR f = NULL;
    EXPECT(gfl(NULL), CKR_ARGUMENTS_BAD);
    EXPECT(gfl(&f), CKR_OK);
    /* Every entry of the function list is populated. */
    int nulls = 0;
    void *const *fp = (void *const *)&f->C_Initialize;
    for (int i = 0; i < 68; i++) if (!fp[i]) nulls++;
    CHECK(nulls == 0);
    IFACE *iface = NULL;
    EXPECT(gi(NULL, NULL, &iface, 0), CKR_OK);
    /* The default interface is the newest (3.2); its list is the 2.40 list's 68 entries,
     * the 24 of 3.0 and the 12 of 3.2, all populated; version 2.40 finds `f`. */
    CHECK(iface && ((CK_VERSION *)iface->pFunctionList)->major == 3
          && ((CK_VERSION *)iface->pFunctionList)->minor == 2);
    void *const *fp32 = (void *const *)((char *)iface->pFunctionList + offsetof(CK_FUNCTION_LIST, C_Initialize));
    nulls = 0;
    for (int i = 0; i < 68 + 24 + 12; i++) if (!fp32[i]) nulls++;
    CHECK(nulls == 0);
    CHECK(fp32[0] == (void *)f->C_Initialize);
    CK_VERSION v240 = {2, 40};
    EXPECT(gi(NULL, &v240, &iface, 0), CKR_OK);
    CHECK(iface && iface->pFunctionList == (void *)f);
    EXPECT(gi(NULL, NULL, NULL, 0), CKR_ARGUMENTS_BAD);

    CK_ULONG n = 0;
    EXPECT(f->C_GetSlotList(CK_TRUE, NULL, &n), CKR_CRYPTOKI_NOT_INITIALIZED);
    CK_C_INITIALIZE_ARGS bad = {0};
    bad.pReserved = &bad;
    EXPECT(f->C_Initialize(&bad), CKR_ARGUMENTS_BAD);
    CK_C_INITIALIZE_ARGS args = {0};
    args.flags = CKF_OS_LOCKING_OK;
    EXPECT(f->C_Initialize(&args), CKR_OK);
    EXPECT(f->C_Initialize(NULL), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    EXPECT(f->C_GetInfo(NULL), CKR_ARGUMENTS_BAD);

    /* Slot list: NULL count, length query, short buffer. */
    EXPECT(f->C_GetSlotList(CK_TRUE, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_GetSlotList(CK_TRUE, NULL, &n), CKR_OK);
    CHECK(n == 1);
    CK_SLOT_ID slots[4];
    n = 0;
    EXPECT(f->C_GetSlotList(CK_TRUE, slots, &n), CKR_BUFFER_TOO_SMALL);
    CHECK(n == 1);
    n = 4;
    EXPECT(f->C_GetSlotList(CK_TRUE, slots, &n), CKR_OK);
    CK_SLOT_INFO si;
    EXPECT(f->C_GetSlotInfo(4242, &si), CKR_SLOT_ID_INVALID);
    EXPECT(f->C_GetSlotInfo(slots[0], NULL), CKR_ARGUMENTS_BAD);
    CK_TOKEN_INFO ti;
    EXPECT(f->C_GetTokenInfo(slots[0], &ti), CKR_OK);
    CK_MECHANISM_INFO mi;
    EXPECT(f->C_GetMechanismInfo(slots[0], 0x7fffffff, &mi), CKR_MECHANISM_INVALID);

    /* Sessions. */
    CK_SESSION_HANDLE s = 0;
    EXPECT(f->C_OpenSession(slots[0], 0, NULL, NULL, &s), CKR_SESSION_PARALLEL_NOT_SUPPORTED);
    EXPECT(f->C_OpenSession(slots[0], CKF_SERIAL_SESSION, NULL, NULL, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), CKR_OK);
    EXPECT(f->C_CloseSession(987654), CKR_SESSION_HANDLE_INVALID);
    EXPECT(f->C_Login(987654, CKU_USER, (CK_UTF8CHAR_PTR)argv[2], strlen(argv[2])), CKR_SESSION_HANDLE_INVALID);
    EXPECT(f->C_Login(s, CKU_USER, NULL, 4), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_Login(s, 77, (CK_UTF8CHAR_PTR)"xxxx", 4), CKR_USER_TYPE_INVALID);
    EXPECT(f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)argv[2], strlen(argv[2])), CKR_OK);
    EXPECT(f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)argv[2], strlen(argv[2])), CKR_USER_ALREADY_LOGGED_IN);

    /* Templates. */
    CK_OBJECT_HANDLE o = 0;
    CK_BBOOL yes = CK_TRUE;
    CK_BYTE value[] = "data";
    CK_ATTRIBUTE no_class[] = {{CKA_TOKEN, &yes, sizeof yes}};
    EXPECT(f->C_CreateObject(s, no_class, 1, &o), CKR_TEMPLATE_INCOMPLETE);
    EXPECT(f->C_CreateObject(s, NULL, 1, &o), CKR_ARGUMENTS_BAD);
    CK_OBJECT_CLASS data_class = CKO_DATA;
    CK_ULONG wrong_len_bool = 5;
    CK_ATTRIBUTE bad_bool[] = {{CKA_CLASS, &data_class, sizeof data_class}, {CKA_TOKEN, &wrong_len_bool, sizeof wrong_len_bool}};
    EXPECT(f->C_CreateObject(s, bad_bool, 2, &o), CKR_ATTRIBUTE_VALUE_INVALID);
    CK_ATTRIBUTE bad_class_len[] = {{CKA_CLASS, &data_class, 3}};
    EXPECT(f->C_CreateObject(s, bad_class_len, 1, &o), CKR_ATTRIBUTE_VALUE_INVALID);
    CK_ATTRIBUTE data_obj[] = {{CKA_CLASS, &data_class, sizeof data_class}, {CKA_VALUE, value, 4}, {CKA_LABEL, "d", 1}};
    EXPECT(f->C_CreateObject(s, data_obj, 3, NULL), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_CreateObject(s, data_obj, 3, &o), CKR_OK);

    /* C_GetAttributeValue: length query, short buffer, invalid type, bad handle. */
    CK_ATTRIBUTE q[] = {{CKA_VALUE, NULL, 0}, {CKA_CLASS, NULL, 0}};
    EXPECT(f->C_GetAttributeValue(s, o, q, 2), CKR_OK);
    CHECK(q[0].ulValueLen == 4 && q[1].ulValueLen == sizeof(CK_ULONG));
    CK_BYTE small[2];
    CK_ATTRIBUTE q2[] = {{CKA_VALUE, small, sizeof small}};
    EXPECT(f->C_GetAttributeValue(s, o, q2, 1), CKR_BUFFER_TOO_SMALL);
    CHECK(q2[0].ulValueLen == CK_UNAVAILABLE_INFORMATION);
    CK_ATTRIBUTE q3[] = {{CKA_MODULUS, NULL, 0}};
    EXPECT(f->C_GetAttributeValue(s, o, q3, 1), CKR_ATTRIBUTE_TYPE_INVALID);
    CHECK(q3[0].ulValueLen == CK_UNAVAILABLE_INFORMATION);
    EXPECT(f->C_GetAttributeValue(s, 0xdeadbeef, q, 2), CKR_OBJECT_HANDLE_INVALID);
    EXPECT(f->C_GetAttributeValue(s, o, NULL, 2), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_DestroyObject(s, 0xdeadbeef), CKR_OBJECT_HANDLE_INVALID);

    /* A key pair, then the length-query protocol of C_Sign. */
    CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    CK_ATTRIBUTE pub[] = {{CKA_EC_PARAMS, p256, sizeof p256}, {CKA_VERIFY, &yes, sizeof yes}};
    CK_ATTRIBUTE priv[] = {{CKA_SIGN, &yes, sizeof yes}};
    CK_MECHANISM gen = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pk = 0, sk = 0;
    EXPECT(f->C_GenerateKeyPair(s, &gen, pub, 2, priv, 1, &pk, NULL), CKR_ARGUMENTS_BAD);
    CK_ATTRIBUTE pub_no_curve[] = {{CKA_VERIFY, &yes, sizeof yes}};
    EXPECT(f->C_GenerateKeyPair(s, &gen, pub_no_curve, 1, priv, 1, &pk, &sk), CKR_TEMPLATE_INCOMPLETE);
    EXPECT(f->C_GenerateKeyPair(s, &gen, pub, 2, priv, 1, &pk, &sk), CKR_OK);
    CK_MECHANISM ecdsa = {CKM_ECDSA_SHA256, NULL, 0};
    CK_BYTE msg[] = "message", sig[128];
    CK_ULONG sl = 0;
    EXPECT(f->C_Sign(s, msg, 7, sig, &sl), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_SignInit(s, &ecdsa, 0xdeadbeef), CKR_KEY_HANDLE_INVALID);
    EXPECT(f->C_SignInit(s, NULL, sk), CKR_ARGUMENTS_BAD);
    CK_MECHANISM bogus = {0x7fffff01, NULL, 0};
    EXPECT(f->C_SignInit(s, &bogus, sk), CKR_MECHANISM_INVALID);
    EXPECT(f->C_SignInit(s, &ecdsa, pk), CKR_KEY_FUNCTION_NOT_PERMITTED);
    EXPECT(f->C_SignInit(s, &ecdsa, sk), CKR_OK);
    EXPECT(f->C_SignInit(s, &ecdsa, sk), CKR_OPERATION_ACTIVE);
    EXPECT(f->C_Sign(s, msg, 7, NULL, &sl), CKR_OK);
    CHECK(sl == 64);
    sl = 10;
    EXPECT(f->C_Sign(s, msg, 7, sig, &sl), CKR_BUFFER_TOO_SMALL);
    CHECK(sl == 64);
    EXPECT(f->C_Sign(s, msg, 7, sig, NULL), CKR_ARGUMENTS_BAD);
    sl = sizeof sig;
    EXPECT(f->C_Sign(s, msg, 7, sig, &sl), CKR_OK);
    CHECK(sl == 64);
    EXPECT(f->C_Sign(s, msg, 7, sig, &sl), CKR_OPERATION_NOT_INITIALIZED);
    EXPECT(f->C_VerifyInit(s, &ecdsa, pk), CKR_OK);
    EXPECT(f->C_Verify(s, msg, 7, sig, 64), CKR_OK);
    EXPECT(f->C_VerifyInit(s, &ecdsa, pk), CKR_OK);
    sig[5] ^= 1;
    EXPECT(f->C_Verify(s, msg, 7, sig, 64), CKR_SIGNATURE_INVALID);
    EXPECT(f->C_VerifyInit(s, &ecdsa, pk), CKR_OK);
    EXPECT(f->C_Verify(s, msg, 7, sig, 3), CKR_SIGNATURE_LEN_RANGE);

    /* Digest length query. */
    CK_MECHANISM sha = {CKM_SHA256, NULL, 0};
    CK_BYTE dig[64];
    CK_ULONG dl = 0;
    EXPECT(f->C_DigestInit(s, &sha), CKR_OK);
    EXPECT(f->C_Digest(s, msg, 7, NULL, &dl), CKR_OK);
    CHECK(dl == 32);
    dl = 31;
    EXPECT(f->C_Digest(s, msg, 7, dig, &dl), CKR_BUFFER_TOO_SMALL);
    dl = sizeof dig;
    EXPECT(f->C_Digest(s, msg, 7, dig, &dl), CKR_OK);
    CHECK(dl == 32);

    /* Bad mechanism parameters. */
    CK_BYTE aesv[32] = {0};
    CK_OBJECT_CLASS sec = CKO_SECRET_KEY;
    CK_KEY_TYPE aes = CKK_AES;
    CK_ATTRIBUTE aesk[] = {{CKA_CLASS, &sec, sizeof sec}, {CKA_KEY_TYPE, &aes, sizeof aes}, {CKA_VALUE, aesv, 32}, {CKA_ENCRYPT, &yes, 1}};
    CK_OBJECT_HANDLE ak = 0;
    EXPECT(f->C_CreateObject(s, aesk, 4, &ak), CKR_OK);
    CK_MECHANISM gcm_noparam = {CKM_AES_GCM, NULL, 0};
    EXPECT(f->C_EncryptInit(s, &gcm_noparam, ak), CKR_MECHANISM_PARAM_INVALID);
    CK_BYTE iv[12] = {0};
    /* Tags below 96 bits are refused (SP 800-38D Appendix C limits). */
    CK_GCM_PARAMS gp = {iv, 12, 96, NULL, 0, 64};
    CK_MECHANISM gcm = {CKM_AES_GCM, &gp, sizeof gp};
    EXPECT(f->C_EncryptInit(s, &gcm, ak), CKR_MECHANISM_PARAM_INVALID);
    gp.ulTagBits = 128;
    EXPECT(f->C_EncryptInit(s, &gcm, ak), CKR_OK);
    CK_BYTE ct[64];
    CK_ULONG cl = 0;
    EXPECT(f->C_Encrypt(s, msg, 7, NULL, &cl), CKR_OK);
    CHECK(cl == 7 + 16);
    cl = sizeof ct;
    EXPECT(f->C_Encrypt(s, msg, 7, ct, &cl), CKR_OK);
    CHECK(cl == 23);

    /* CKM_AES_CMAC_GENERAL (CK_MAC_GENERAL_PARAMS = CK_ULONG): RFC 4493 example 2 cut to
     * 8 bytes; a length over 16 and a parameter of the wrong size are refused. */
    CK_BYTE cmk[16] = {0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c};
    CK_BYTE cmm[16] = {0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93, 0x17, 0x2a};
    CK_BYTE cmt[8] = {0x07, 0x0a, 0x16, 0xb4, 0x6b, 0x4d, 0x41, 0x44};
    CK_ATTRIBUTE cmkt[] = {{CKA_CLASS, &sec, sizeof sec}, {CKA_KEY_TYPE, &aes, sizeof aes}, {CKA_VALUE, cmk, 16}, {CKA_SIGN, &yes, 1}, {CKA_VERIFY, &yes, 1}};
    CK_OBJECT_HANDLE ck = 0;
    EXPECT(f->C_CreateObject(s, cmkt, 5, &ck), CKR_OK);
    CK_ULONG mac_len = 8;
    CK_MECHANISM cmac_g = {CKM_AES_CMAC_GENERAL, &mac_len, sizeof mac_len};
    CK_BYTE tag[16];
    CK_ULONG tl = sizeof tag;
    EXPECT(f->C_SignInit(s, &cmac_g, ck), CKR_OK);
    EXPECT(f->C_Sign(s, cmm, 16, tag, &tl), CKR_OK);
    CHECK(tl == 8 && memcmp(tag, cmt, 8) == 0);
    EXPECT(f->C_VerifyInit(s, &cmac_g, ck), CKR_OK);
    EXPECT(f->C_Verify(s, cmm, 16, cmt, 8), CKR_OK);
    mac_len = 17;
    EXPECT(f->C_SignInit(s, &cmac_g, ck), CKR_MECHANISM_PARAM_INVALID);
    CK_BYTE short_param[4] = {8, 0, 0, 0};
    CK_MECHANISM cmac_bad = {CKM_AES_CMAC_GENERAL, short_param, sizeof short_param};
    EXPECT(f->C_SignInit(s, &cmac_bad, ck), CKR_MECHANISM_PARAM_INVALID);

    /* CKM_SHA256_HMAC_GENERAL: RFC 4231 test case 5 (output truncated to 128 bits); a length
     * over the hash's 32 bytes is refused, a truncated tag of the wrong length too. */
    CK_BYTE hk5[20];
    memset(hk5, 0x0c, sizeof hk5);
    CK_KEY_TYPE gen_kt = CKK_GENERIC_SECRET;
    CK_ATTRIBUTE hkt[] = {{CKA_CLASS, &sec, sizeof sec}, {CKA_KEY_TYPE, &gen_kt, sizeof gen_kt}, {CKA_VALUE, hk5, 20}, {CKA_SIGN, &yes, 1}, {CKA_VERIFY, &yes, 1}};
    CK_OBJECT_HANDLE hk = 0;
    EXPECT(f->C_CreateObject(s, hkt, 5, &hk), CKR_OK);
    CK_BYTE tc5[] = "Test With Truncation";
    CK_BYTE tc5_mac[16] = {0xa3, 0xb6, 0x16, 0x74, 0x73, 0x10, 0x0e, 0xe0, 0x6e, 0x0c, 0x79, 0x6c, 0x29, 0x55, 0x55, 0x2b};
    CK_ULONG hmac_len = 16;
    CK_MECHANISM hmac_g = {CKM_SHA256_HMAC_GENERAL, &hmac_len, sizeof hmac_len};
    tl = sizeof tag;
    EXPECT(f->C_SignInit(s, &hmac_g, hk), CKR_OK);
    EXPECT(f->C_Sign(s, tc5, 20, tag, &tl), CKR_OK);
    CHECK(tl == 16 && memcmp(tag, tc5_mac, 16) == 0);
    EXPECT(f->C_VerifyInit(s, &hmac_g, hk), CKR_OK);
    EXPECT(f->C_Verify(s, tc5, 20, tc5_mac, 16), CKR_OK);
    EXPECT(f->C_VerifyInit(s, &hmac_g, hk), CKR_OK);
    EXPECT(f->C_Verify(s, tc5, 20, tc5_mac, 15), CKR_SIGNATURE_LEN_RANGE);
    hmac_len = 33;
    EXPECT(f->C_SignInit(s, &hmac_g, hk), CKR_MECHANISM_PARAM_INVALID);

    /* C_WaitForSlotEvent: no event, never blocks. */
    CK_SLOT_ID ev = 0;
    EXPECT(f->C_WaitForSlotEvent(CKF_DONT_BLOCK, &ev, NULL), CKR_NO_EVENT);
    EXPECT(f->C_WaitForSlotEvent(0, &ev, NULL), CKR_FUNCTION_NOT_SUPPORTED);

    EXPECT(f->C_GenerateRandom(s, NULL, 10), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_FindObjects(s, NULL, 1, &n), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_Finalize((void *)1), CKR_ARGUMENTS_BAD);
    EXPECT(f->C_Finalize(NULL), CKR_OK);
    EXPECT(f->C_Finalize(NULL), CKR_CRYPTOKI_NOT_INITIALIZED);
    if (failures) { fprintf(stderr, "%d failures\n", failures); return 1; }
    printf("all C-API checks passed\n");
    return 0;
}
