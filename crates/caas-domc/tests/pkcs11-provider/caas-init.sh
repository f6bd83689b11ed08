#!/bin/bash -e
# Token init script for the pkcs11-provider test suite (latchset/pkcs11-provider,
# tests/setup.sh sources one per token type): a caas crypto domain serving one token,
# reached through libcaas_pkcs11.so (README.md beside this file: results).
# Needs CAAS_P11LIB (libcaas_pkcs11.so) and CAAS_DOMC_BIN (the caas-domc binary).

title SECTION "Starting a caas crypto domain"

P11LIB="${CAAS_P11LIB:?set CAAS_P11LIB to libcaas_pkcs11.so}"
export P11LIB
: "${CAAS_DOMC_BIN:?set CAAS_DOMC_BIN to the caas-domc binary}"

CAAS_SOCKET="$TOKDIR/domc.sock"
"$CAAS_DOMC_BIN" domc serve --create-key --run-as "$(id -u):$(id -g)" \
    --state-dir "$TOKDIR/state" --socket "$CAAS_SOCKET" \
    > "$TOKDIR/domc.log" 2>&1 &
echo $! > "$TOKDIR/domc.pid"
for _ in $(seq 100); do
    test -S "$CAAS_SOCKET" && break
    sleep 0.1
done
export CAAS_PKCS11_SOCKET="$CAAS_SOCKET"

export TOKENLABEL="caas Token"
export TOKENLABELURI="caas%20Token"

pkcs11-tool --module "${P11LIB}" --init-token \
    --label "${TOKENLABEL}" --so-pin "${PINVALUE}" 2>&1
pkcs11-tool --module "${P11LIB}" --so-pin "${PINVALUE}" \
    --login --login-type so --init-pin --pin "${PINVALUE}" 2>&1

export TOKENCONFIGVARS="export CAAS_PKCS11_SOCKET=${CAAS_SOCKET}"
export TESTPORT="36000"

# What the domain serves (caas_domc::ops). Ed448 and X25519 are served. setup.sh makes the
# Ed448 and X25519 keys with pkcs11-tool, which knows "EC:Ed448" and "EC:X25519" from OpenSC
# 0.26 on (setup.sh turns Ed448 off for older OpenSC), and with X25519 on, the tls test
# offers groups in OpenSSL 3.5's "?group" syntax; so X25519 is on only with both. No X448;
# no symmetric keys for the provider's skey tests. ML-DSA/ML-KEM are served, but the suite
# makes those keys with OpenSSL >= 3.5.
OSSL_MINOR=$(openssl version | sed -n 's/^OpenSSL 3\.\([0-9]*\).*/\1/p')
if [[ "${OPENSC_VERSION:-0}" -ge 26 && "${OSSL_MINOR:-0}" -ge 5 ]]; then
    export SUPPORT_X25519=1
else
    export SUPPORT_X25519=0
fi
export SUPPORT_X448=0
# CKA_ALLOWED_MECHANISMS is honoured and the rsapssam keys (RSA-3092) are made: the domain
# makes RSA keys of any size from 2048 to 4096 bits.
export SUPPORT_ALLOWED_MECHANISMS=1
export SUPPORT_SYMMETRIC=0
export SUPPORT_ML_DSA=0
export SUPPORT_ML_KEM=0
