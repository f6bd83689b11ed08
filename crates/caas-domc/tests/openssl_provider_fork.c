/* Fork safety through the pkcs11-provider (openssl_provider.rs): an OpenSSL 3 application
 * loads the pkcs11 and default providers, opens a private key in the crypto domain by its
 * pkcs11: URI, signs, forks, and signs again in the child and in the parent. Every
 * signature is verified with the exported public key by the default provider.
 * Usage: openssl_provider_fork PRIVATE-KEY-URI PUBLIC-KEY.pem */
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/store.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const unsigned char MSG[] = "signed in a forked process";

static EVP_PKEY *load_private(const char *uri)
{
    EVP_PKEY *key = NULL;
    OSSL_STORE_CTX *store = OSSL_STORE_open(uri, NULL, NULL, NULL, NULL);
    if (store == NULL)
        return NULL;
    while (key == NULL && !OSSL_STORE_eof(store)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(store);
        if (info == NULL)
            break;
        if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY)
            key = OSSL_STORE_INFO_get1_PKEY(info);
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(store);
    return key;
}

/* Signs MSG with `key` (in the domain) and verifies with `pub` (default provider). */
static int sign_and_verify(const char *who, EVP_PKEY *key, EVP_PKEY *pub)
{
    unsigned char sig[256];
    size_t len = sizeof(sig);
    int ok = 0;
    EVP_MD_CTX *s = EVP_MD_CTX_new(), *v = EVP_MD_CTX_new();
    if (s == NULL || v == NULL)
        goto out;
    if (EVP_DigestSignInit_ex(s, NULL, "SHA256", NULL, NULL, key, NULL) != 1 ||
        EVP_DigestSign(s, sig, &len, MSG, sizeof(MSG)) != 1) {
        fprintf(stderr, "%s: signing failed\n", who);
        goto out;
    }
    if (EVP_DigestVerifyInit_ex(v, NULL, "SHA256", NULL, "provider=default", pub, NULL) != 1 ||
        EVP_DigestVerify(v, sig, len, MSG, sizeof(MSG)) != 1) {
        fprintf(stderr, "%s: signature does not verify\n", who);
        goto out;
    }
    printf("%s: signature verified (%zu bytes)\n", who, len);
    fflush(stdout);
    ok = 1;
out:
    if (!ok)
        ERR_print_errors_fp(stderr);
    EVP_MD_CTX_free(s);
    EVP_MD_CTX_free(v);
    return ok;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PRIVATE-KEY-URI PUBLIC-KEY.pem\n", argv[0]);
        return 2;
    }
    if (OSSL_PROVIDER_load(NULL, "pkcs11") == NULL || OSSL_PROVIDER_load(NULL, "default") == NULL) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    FILE *f = fopen(argv[2], "r");
    EVP_PKEY *pub = f ? PEM_read_PUBKEY(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    EVP_PKEY *key = load_private(argv[1]);
    if (pub == NULL || key == NULL) {
        fprintf(stderr, "cannot load the keys\n");
        ERR_print_errors_fp(stderr);
        return 1;
    }
    if (!sign_and_verify("parent", key, pub))
        return 1;
    pid_t child = fork();
    if (child < 0)
        return 1;
    if (child == 0) {
        /* The child inherits the provider, its module and the open key. */
        _exit(sign_and_verify("child", key, pub) && sign_and_verify("child", key, pub) ? 0 : 1);
    }
    int ok = sign_and_verify("parent after fork", key, pub);
    int status = 0;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "child failed (status %d)\n", status);
        ok = 0;
    }
    EVP_PKEY_free(key);
    EVP_PKEY_free(pub);
    return ok ? 0 : 1;
}
