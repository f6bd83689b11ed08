/* A forked child and the module's connections (the module tells a child from its parent by
 * a pthread_atfork handler, not by a getpid per call): the child is refused the parent's
 * pool (CKR_CRYPTOKI_NOT_INITIALIZED) until it calls C_Initialize itself, the parent keeps
 * signing, and fork() still works after the module was finalized and dlclose'd (the
 * handler does not outlive the module). Built and run by capi.rs.
 * Usage: fork_child MODULE USER_PIN */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <p11-kit/pkcs11.h>

static int failures = 0;
#define EXPECT(who, call, want) do { CK_RV rv_ = (call); if (rv_ != (CK_RV)(want)) { \
    fprintf(stderr, "FAIL %s line %d: %s returned 0x%lx, expected 0x%lx\n", who, __LINE__, #call, \
            (unsigned long)rv_, (unsigned long)(want)); failures++; } else { \
    printf("ok %s: %s -> 0x%lx\n", who, #call, (unsigned long)rv_); } } while (0)

static CK_RV sign(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE k) {
    CK_MECHANISM m = { CKM_ECDSA_SHA256, NULL, 0 };
    CK_BYTE data[] = "fork", sig[128];
    CK_ULONG len = sizeof sig;
    CK_RV rv = f->C_SignInit(s, &m, k);
    return rv != CKR_OK ? rv : f->C_Sign(s, data, sizeof data - 1, sig, &len);
}

static CK_RV keypair(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *priv) {
    static CK_BYTE p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
    CK_BBOOL t = CK_TRUE;
    CK_ATTRIBUTE pub_t[] = { { CKA_EC_PARAMS, p256, sizeof p256 } };
    CK_ATTRIBUTE priv_t[] = { { CKA_SIGN, &t, sizeof t } };
    CK_MECHANISM m = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
    CK_OBJECT_HANDLE pub;
    return f->C_GenerateKeyPair(s, &m, pub_t, 1, priv_t, 1, &pub, priv);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: fork_child MODULE PIN\n"); return 2; }
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 2; }
    CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR f = NULL;
    if (!gfl || gfl(&f) != CKR_OK) { fprintf(stderr, "no function list\n"); return 2; }
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE k = 0;
    CK_ULONG n = 0;
    EXPECT("parent", f->C_Initialize(NULL), CKR_OK);
    EXPECT("parent", f->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), CKR_OK);
    EXPECT("parent", f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)argv[2], strlen(argv[2])), CKR_OK);
    EXPECT("parent", keypair(f, s, &k), CKR_OK);
    EXPECT("parent", sign(f, s, k), CKR_OK);
    EXPECT("parent", sign(f, s, k), CKR_OK);

    fflush(stdout);
    pid_t child = fork();
    if (child < 0) { perror("fork"); return 2; }
    if (child == 0) {
        /* The parent's pool is not the child's: every call is refused, the fused
         * single-part path included, until the child initialises its own. */
        EXPECT("child", f->C_GetSlotList(CK_FALSE, NULL, &n), CKR_CRYPTOKI_NOT_INITIALIZED);
        EXPECT("child", sign(f, s, k), CKR_CRYPTOKI_NOT_INITIALIZED);
        EXPECT("child", f->C_Initialize(NULL), CKR_OK);
        EXPECT("child", f->C_GetSlotList(CK_FALSE, NULL, &n), CKR_OK);
        CK_SESSION_HANDLE cs;
        CK_OBJECT_HANDLE ck = 0;
        EXPECT("child", f->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &cs), CKR_OK);
        EXPECT("child", f->C_Login(cs, CKU_USER, (CK_UTF8CHAR_PTR)argv[2], strlen(argv[2])), CKR_OK);
        EXPECT("child", keypair(f, cs, &ck), CKR_OK);
        EXPECT("child", sign(f, cs, ck), CKR_OK);
        EXPECT("child", f->C_Finalize(NULL), CKR_OK);
        fflush(stdout);
        _exit(failures ? 1 : 0);
    }
    int st = 0;
    waitpid(child, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { fprintf(stderr, "FAIL: child status %d\n", st); failures++; }
    /* The parent is still the pool's owner. */
    EXPECT("parent", f->C_Initialize(NULL), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    EXPECT("parent", sign(f, s, k), CKR_OK);
    EXPECT("parent", f->C_Finalize(NULL), CKR_OK);
    dlclose(h);
    /* fork() after the module is gone runs no handler of it. */
    fflush(stdout);
    pid_t late = fork();
    if (late < 0) { perror("fork"); return 2; }
    if (late == 0) _exit(0);
    waitpid(late, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { fprintf(stderr, "FAIL: fork after dlclose: status %d\n", st); failures++; }
    else printf("ok: fork after dlclose\n");
    if (failures) { fprintf(stderr, "%d failures\n", failures); return 1; }
    printf("all fork checks passed\n");
    return 0;
}
