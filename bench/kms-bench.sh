#!/usr/bin/env bash
# KMS benchmark (issue 14): caas beside Cosmian KMS 5.28, measured in one run with the same
# out-of-process load generator (wrk, 2 threads, keep-alive connections, a Lua script per
# cell), on the same machine and disk.
#
#   caas:    a release `caas dev` (the production key service, every role and route; SQLite
#            in WAL with synchronous=FULL on the disk under $WORKDIR), CAAS_LOG=warn,
#            127.0.0.1, run once per audit durability (`strict`, `bounded`).
#            Every request carries a real SigV4 signature, verified by the server on every
#            request. caas does not refuse an identical replayed signed request (neither
#            does AWS KMS: a signature is valid for 5 minutes, KMS has no nonce), so each
#            cell replays one request signed just before the cell starts (botocore's
#            SigV4Auth); the server still canonicalises, hashes the body and checks the
#            HMAC every time.
#   Cosmian: cosmian_kms_server 5.28.0 from the crates registry (BUSL-1.1: built and run
#            locally for measurement only, never vendored), feature non-fips, SQLite, no
#            authentication, RUST_LOG=warn, 127.0.0.1; KMIP 2.1 JSON (POST /kmip/2_1) on an
#            AES-256 key created with an activation date; byte strings are upper-case hex.
#
# Cells: Encrypt 64 B, Encrypt 1 KiB, Decrypt 64 B (the ciphertext of a 64-byte plaintext),
# at 16 and 64 connections; caas in both audit modes; caas's own HTTP ceiling (GET /healthz)
# at the same connection counts, each caas figure also given as a fraction of it.
# Ends with one summary line per cell and mode:
#   kms-bench: Encrypt 64B 16 clients (bounded): caas N req/s, cosmian M req/s, ratio R
# followed by p50/p99 of both.
#
# Usage: bench/kms-bench.sh
#   PEER=none (caas only, for iterating on caas: no peer figures, ratio n/a)
#   SECS=10 (seconds per cell)  ROUNDS=2 (each cell is the best of ROUNDS runs)
#   CELLS="enc64 enc1k dec64" MODES="bounded strict" CONNS="16 64" (a subset, for iterating)
#   CAAS_BIN=path/to/release/caas (default: cargo build --release -p caas)
#   COSMIAN_BIN=path/to/cosmian_kms (default: built once into $COSMIAN_CACHE)
#   COSMIAN_CACHE=~/.cache/caas-bench/cosmian (the peer's build, reused; ~3 GB of build
#   artefacts under $COSMIAN_CACHE/target — delete it after building if disk is short)
#   WORKDIR=(a temporary directory on the real disk, not tmpfs: fsync must cost what it costs)
# Needs: wrk, curl, python3 with botocore (the repo's .venv: scripts/install-deps),
# cargo; building the peer needs libssl-dev and pkg-config (Debian 12: OpenSSL 3.0, no FIPS
# provider, hence non-fips).
#
# Server CPU per request (the "server CPU per request" lines: user + system time of the
# server process over the cell, divided by the requests it answered) is the figure that
# survives a busy machine: req/s and latency swing with the other builders' load, CPU per
# request barely does, and on these 2 CPUs a CPU-bound server's throughput follows it.
#
# Figures (2026-12-06 14:52 and 15:30 UTC, this machine QUIET: load average 1.7-1.9 at the
# start, 3.2 at the end; lead, main at e7cd9c3 (mimalloc, tokio event_interval 1, borrowed
# SigV4 headers); `COSMIAN_BIN=/work/.cache/cosmian/bin/cosmian_kms CAAS_BIN=<release caas>
# SECS=10 ROUNDS=1 bench/kms-bench.sh`, twice; GET /healthz 130-131 k / 132-136 k req/s,
# p99 3.1-3.7 / 2.5-3.9 ms). Ratio (p99 ms) of the two runs, then CPU us/req of the second:
#   cell                 bounded ratio (p99)        strict ratio (p99)         CPU caas b/s vs cosmian
#   Encrypt 64B  16c     1.62 (3.83), 1.40 (3.77)   0.96 (1.87), 0.92 (1.81)   25.9 / 34.8 vs 41.4
#   Encrypt 64B  64c     1.45 (5.90), 1.40 (5.95)   1.20 (3.97), 1.18 (4.27)   25.0 / 29.0 vs 37.9
#   Encrypt 1KiB 16c     2.37 (4.05), 2.45 (4.09)   1.64 (1.87), 1.78 (1.87)   29.7 / 37.6 vs 97.0
#   Encrypt 1KiB 64c     2.64 (6.35), 2.65 (5.79)   2.18 (5.19), 2.18 (5.42)   28.7 / 33.5 vs 95.5
#   Decrypt 64B  16c     1.33 (3.86), 1.38 (3.68)   0.91 (1.89), 0.89 (1.86)   25.7 / 35.0 vs 41.4
#   Decrypt 64B  64c     1.49 (6.89), 1.50 (5.69)   1.31 (4.11), 1.24 (3.96)   24.3 / 28.6 vs 40.5
#   (Cosmian p99 3.5-7.2 ms.) A third run (16:02 UTC, load 0.2 at the start, same binary):
#   bounded Encrypt 64B 1.48 / 1.42 (16c / 64c), Decrypt 64B 1.31 / 1.46, Encrypt 1KiB
#   2.07 / 2.62; strict 0.94 / 1.19, 0.93 / 1.29, 1.37 / 2.14; /healthz p99 3.5 / 4.3 ms.
#   A fourth run (2026-12-06 17:56 UTC, main at d49a1b8, whose changes are outside the
#   key service's request path; load 1.9 at the start; /healthz 132 k req/s, p99 3.6 /
#   2.7 ms): bounded Encrypt 64B 1.62 / 1.43 (16c / 64c), Decrypt 64B 1.51 / 1.50, Encrypt
#   1KiB 2.72 / 2.74; strict 0.88 / 1.16, 0.92 / 1.24, 1.76 / 2.18; CPU us/req bounded
#   24.5-29.0, strict 29.0-38.1, Cosmian 39.5-98.7. An hour earlier the same cells ran at
#   27.7-28.3 us/req and /healthz at 121 k req/s: the host's speed moves in phases.
#   A fifth run (2026-12-06 19:50 UTC, main at adbc231: the key service now locks its
#   memory, mlockall MCL_ONFAULT, as root here; load 2.0 at the start; /healthz 115 / 124 k
#   req/s, p99 2.9 / 3.0 ms; a slow phase, Cosmian at 46-50 us/req): bounded Encrypt 64B
#   1.42 / 1.50 (16c / 64c), Decrypt 64B 1.38 / 1.61, Encrypt 1KiB 2.50 / 2.58; strict
#   1.06 / 1.25, 0.93 / 1.43, 1.82 / 2.30; CPU us/req bounded 26.9-32.3, strict 29.9-41.2.
#   The memory locking costs nothing measurable (alternated A/B before it, `PEER=none
#   SECS=6 MODES=bounded CELLS=enc64`: 27.6-29.4 us/req without, 27.3-30.3 with).
#   What changed since the 13:05 run (bounded Encrypt 64B 16c
#   1.19, 64c 1.26; CPU 29-31 us):
#   - glibc malloc was ~13 % of caas's CPU (arena locks taken when the writer frees records
#     the workers allocated: 10 % of caas's context switches were __lll_lock_wait_private;
#     malloc_consolidate on hyper's read buffers). With mimalloc as the global allocator
#     (crates/caas/src/main.rs): 31.7-32.6 -> 27.3 us/req, 37-41 k -> 44.4 k req/s at 16c
#     (`PEER=none SECS=20 CELLS=enc64 CONNS=16 MODES=bounded`, vmstat beside it). It had been
#     dropped once because the crypto domain (the same binary) hung under mlockall
#     (MCL_FUTURE populated mimalloc's reservations); it now locks with MCL_ONFAULT.
#   - At 16 connections a fifth of the two CPUs stayed idle (vmstat) while 16 requests were
#     outstanding: the worker holding tokio's I/O driver polled it only every 61 tasks
#     (event_interval) while the other slept, so ready sockets waited. Polling after every
#     task (one non-blocking epoll_wait): 45.7 k -> 53.3-53.7 k req/s, idle 20 % -> 6 %,
#     CPU 27.3 -> 25.3 us (event_interval 3 and 7: 50.2-50.3 k). One worker instead of two:
#     41-45 k. The 16c cells are still bimodal between runs (44-48 k or 53-55 k req/s at
#     the same CPU per request, the slow mode with ~20 % idle again): placement of wrk's and
#     caas's threads on the two vCPUs, not found.
#   - SigV4 borrows the request's headers instead of two String copies per header, and
#     seal draws nonce and IV in one DRBG call: 24.5-24.7 -> 24.2 us/req at 64c.
#   Tried and dropped: (1) a sync thread overlapping the WAL fsync with the next group
#   (synchronous=NORMAL, fdatasync of the WAL before any reply, anchor moved after it):
#   strict 16c 31.5 k -> 30.4 k req/s, 35 -> 42 us/req — the writer committed small groups
#   as soon as a sync began (alternating small/large syncs) and every group paid a thread
#   hand-over; (2) a strict gathering delay of 100/200/300 us before each group: 25/21/18 k
#   (timer slack, and the groups did not grow); (3) wal_autocheckpoint 10000 and page_size
#   1024: within noise (31.1-32.7 k). Strict at 16c stays latency-bound: `perf trace -s`
#   on the writer shows one fsync per group at ~0.28 ms (0.24 of the writer's wall time),
#   ~10 pwrite64 (5 WAL frames) and 6 fcntl locks per group. p99 at 64 connections: caas
#   bounded 5.7-6.9 ms, strict 4.0-4.3 ms, Cosmian 5.1-5.8 ms, the harness's /healthz
#   2.5-3.9 ms: the < 3 ms goal is below what this 2-vCPU machine gives even the no-op
#   route once KMS work shares the CPUs with wrk.
#
# Figures (2026-12-06 13:05-13:09 UTC, this machine QUIET: load average 1.9 at the start,
# 3.5 at the end; lead, main after h/kmsstrict (8fa0524 + lead commits); `COSMIAN_BIN=
# /work/.cache/cosmian/bin/cosmian_kms CAAS_BIN=/work/target-rel/release/caas SECS=10
# ROUNDS=1 bench/kms-bench.sh`; GET /healthz 138.5 k / 156.1 k req/s, p99 2.09 / 3.02 ms):
#   cell                 bounded ratio (p99 ms)  strict ratio (p99 ms)  CPU us/req caas b/s vs cosmian
#   Encrypt 64B  16c     1.19 (3.34)             0.83 (1.91)            30.6 / 41.1 vs 41.8
#   Encrypt 64B  64c     1.26 (5.43)             1.06 (3.86)            29.4 / 34.8 vs 40.1
#   Encrypt 1KiB 16c     1.87 (3.26)             1.35 (1.91)            34.7 / 44.1 vs 87.8
#   Encrypt 1KiB 64c     2.07 (5.03)             1.66 (4.12)            33.4 / 40.0 vs 88.4
#   Decrypt 64B  16c     1.18 (3.15)             0.83 (1.94)            29.9 / 39.2 vs 41.1
#   Decrypt 64B  64c     1.34 (4.79)             1.12 (3.58)            28.6 / 33.6 vs 40.7
#   (Cosmian p99 1.5-6.2 ms.) On this machine the peer costs ~41 us per small request (it
#   cost 62-69 us on the machine of the earlier runs) and caas ~29-31 (35-43 before): the
#   64 B goals (>= 1.5x bounded, strict >= 1.0x at 16 connections, p99 < 3 ms at 64) are not
#   met; 1 KiB is. Next for strict at 16 connections (latency-bound: one ~0.3 ms fsync per
#   group of ~8): overlap the WAL's fsync with the next group's work, which needs SQLite's
#   own syncs off and the checkpoints' syncs done by hand to keep "a reply means on disk".
#
# Figures (2026-12-06 12:41-12:44 UTC, this machine QUIET: load average 2.6 at the start,
# 3.1 at the end; helper h/kmsstrict at 82de5ee; `COSMIAN_BIN=/work/.cache/cosmian/bin/
# cosmian_kms CAAS_BIN=<release caas of 82de5ee> SECS=10 ROUNDS=1 CELLS="enc64 dec64"
# bench/kms-bench.sh`; GET /healthz 134 k / 154 k req/s, p99 1.44 / 2.42 ms). The machine
# (rebooted at 11:24) is faster than in the runs below, Cosmian most of all: its CPU per
# request fell from 62-69 to 39-42 us (caas bounded from 35-43 to 27-31), so every ratio
# moved down against the 10:11 run:
#   cell                 bounded ratio (p99 ms)  strict ratio (p99 ms)  CPU us/req caas b/s vs cosmian
#   Encrypt 64B  16c     1.28 (3.04)             0.88 (1.90)            30.8 / 39.3 vs 42.2
#   Encrypt 64B  64c     1.31 (5.50)             1.07 (3.77)            28.7 / 34.5 vs 40.7
#   Decrypt 64B  16c     1.11 (3.01)             0.77 (1.81)            30.1 / 39.1 vs 38.6
#   Decrypt 64B  64c     1.37 (5.26)             1.14 (3.53)            27.4 / 32.9 vs 40.9
#   (Cosmian p99 3.4-5.4 ms.) Strict at 16 connections is latency-bound, not CPU-bound:
#   each Encrypt waits for a group commit whose fsync takes ~0.3 ms here, and only ~8 of
#   the 16 requests are queued when a group starts (`transactions=14108 batches=107554`
#   in a 5 s strict 16c cell), so strict's req/s is ~16 / (request time + ~1.5 group
#   cycles). What h/kmsstrict changed, A/B against main's 5970c75 (`base`) in back-to-back
#   pairs (`PEER=none CELLS="enc64 dec64" CONNS="16 64" SECS=5 ROUNDS=1`, load 0.3-2.8):
#   - strict: the group's last record is signed as it is inserted (no UPDATE of it), BEGIN/
#     COMMIT from the statement cache, and outside a KMS domain the audit checkpoint carries
#     that record's signature (slot version 2) instead of a second Ed25519 signature per
#     group on the checkpoint thread (5-7 % of caas's perf samples under strict 16c).
#     Server CPU per request, strict, base -> new, three pairs (12:28, 12:30, 12:40):
#       Encrypt 64B 16c  42.7 -> 39.7, 43.7 -> 43.3, 41.9 -> 39.7
#       Decrypt 64B 16c  42.1 -> 39.3, 43.1 -> 39.8, 41.1 -> 39.1
#       Encrypt 64B 64c  36.0 -> 36.3, 39.5 -> 37.4, 34.6 -> 34.7
#       Decrypt 64B 64c  34.3 -> 34.3, 36.0 -> 35.3, 33.2 -> 33.2
#     req/s strict 16c Encrypt 26.5 / 26.7 / 27.7 k -> 29.4 / 26.4 / 28.7 k, Decrypt
#     27.0 / 26.9 / 27.7 k -> 29.2 / 28.6 / 28.0 k: about -5 % CPU and +5 % req/s at 16c,
#     nothing measurable at 64c; bounded unchanged (its groups are large).
#   - bounded: at 64 connections 1.6-1.7 % of bounded Encrypts waited for durability
#     (`deferred_waited`, now logged at shutdown with CAAS_LOG=info): the writer hashed and
#     inserted a whole 4 ms group (~200 records) in one burst after the interval, and with
#     its fsync on 2 busy CPUs the oldest records passed the 7 ms back-pressure age. The
#     group now applies what has arrived every millisecond while it gathers: 1.1 % waited,
#     p99 5.62 / 6.96 -> 5.18 / 5.14 ms (two pairs, 12:36-12:38), CPU unchanged (~28.5 us).
#     The remaining bounded p99 at 64c (5.1-5.6 ms, strict's 3.5-3.8 ms) is those 1 % of
#     waits plus CPU oversubscription; GET /healthz's own p99 is 2.4 ms at 64c here.
#   Tried and dropped: fdatasync instead of fsync for SQLite (LIBSQLITE3_FLAGS=
#   -DHAVE_FDATASYNC=1; the disk is ext4 without a journal): block requests per group
#   commit stayed ~2.5 (perf stat block:block_rq_issue) and ext4_write_inode still showed
#   in the writer's profile (the database file grows at every checkpoint); no measurable
#   gain, so the repository-wide build setting was not kept. Where strict's extra CPU
#   over bounded (~9 us/req at 16c) goes, perf (strict Encrypt 16c): the writer thread
#   32 % of caas's samples, of which fdatasync/fsync ~12 points (virtio notify `iowrite16`
#   ~5, i.e. VM exits), WAL pwrites ~3.5, Ed25519 ~2.3, record hashing ~1.3, waking the
#   waiting tasks (futex/eventfd) ~3; the tokio workers park and unpark between groups
#   (futex/epoll ~14 % of their samples, against ~0 under bounded).
#
# Figures (2026-12-06 10:11 UTC, this machine QUIET: load average 1.8 at the start, 2.9 at
# the end; lead, after h/kmsfast (own HTTP/1 loop, no strict commit delay); `COSMIAN_BIN=
# /work/.cache/cosmian/bin/cosmian_kms CAAS_BIN=/work/target-rel/release/caas SECS=10
# ROUNDS=2 bench/kms-bench.sh`; GET /healthz 104 k / 81 k req/s, p99 3.34 / 4.21 ms):
#   cell                 bounded ratio (p99 ms)  strict ratio (p99 ms)  CPU us/req caas b/s vs cosmian
#   Encrypt 64B  16c     1.66 (4.04)             0.98 (2.38)            35.0 / 61.0 vs 68.5
#   Encrypt 64B  64c     1.53 (7.69)             1.49 (4.67)            37.2 / 39.8 vs 65.1
#   Encrypt 1KiB 16c     2.48 (4.35)             1.85 (2.33)            45.4 / 59.9 vs 140.7
#   Encrypt 1KiB 64c     2.09 (10.65)            2.56 (6.26)            56.0 / 46.3 vs 142.7
#   Decrypt 64B  16c     1.29 (8.71)             1.11 (2.03)            42.9 / 51.4 vs 64.2
#   Decrypt 64B  64c     1.33 (8.80)             1.38 (4.82)            39.6 / 39.4 vs 62.7
#   Encrypt 64B bounded met 1.5x at both connection counts for the first time; Decrypt 64B
#   bounded did not (1.29/1.33, its CPU per request 40-43 us in this run against 37 in the
#   07:49 run: cell-to-cell noise of ~15 % on this machine), strict Encrypt 64B 16c 0.98.
#   p99 at 64 connections stays above 3 ms, as does the harness's own /healthz p99 (4.21 ms).
#   A second run at 10:40 (load 2-3, same command with CELLS="dec64 enc64" CONNS=16):
#   Encrypt 64B 16c bounded 1.39 (39.0 us/req), strict 1.02; Decrypt 64B 16c bounded 1.64
#   (35.6 us/req), strict 1.01 — each cell swings ~±15 % between runs, across the 1.5x line.
#
# Figures (2026-12-06 09:33-09:40 UTC, helper run, machine BUSY: load average 3.7-5.1,
# a test build running beside it; h/kmsfast against the release caas of 3023be7 (`base`),
# alternating base/new twice; `PEER=none CELLS="enc64 enc1k dec64" CONNS="16 64" SECS=5
# ROUNDS=1 CAAS_BIN=… bench/kms-bench.sh`). Server CPU per request, base → new, the two
# pairs, bounded:
#   Encrypt 64B  16c  38.8 → 42.0, 51.9 → 41.7    64c  43.9 → 38.2, 44.8 → 40.2
#   Encrypt 1KiB 16c  44.2 → 49.4, 60.5 → 47.4    64c  48.5 → 43.8, 55.4 → 49.4
#   Decrypt 64B  16c  37.8 → 36.7, 53.2 → 39.9    64c  38.2 → 38.4, 48.4 → 44.1
#   mean of the 12 bounded cells 47.1 → 42.6 us (-10%); strict unchanged (60.3 → 60.6).
#   Earlier pair (09:21, load 5): bounded Encrypt 64B 16c 44.5, 41.7 → 36.0, 37.6 us.
#   Instructions (valgrind --tool=callgrind, instrumentation on during the Encrypt 64B
#   16c bounded cell only): 219-230 k → 203-210 k per request; callgrind overweights
#   SHA-256 and Ed25519 (no SHA-NI under valgrind), so the real-CPU saving is larger.
#   What changed: the KMS endpoint's plain-HTTP front is our own hyper HTTP/1.1 loop
#   (`server::serve_plain`: TCP_NODELAY, a 30 s header-read timeout against slowloris —
#   axum::serve had none — and a 16 KiB head limit); the route middleware no longer
#   copies method/path/pattern for the KMS and public routes and keeps its other paths in
#   a boxed future; SigV4 hashes into the canonical request / string to sign without hex
#   temporaries, decodes the signature onto the stack and looks up cached signing keys by
#   borrowed strings; the request's future shrank from ~7.2 KiB to ~2.4 KiB (handle_on, in
#   release) by boxing the cold paths (key-cache miss, alias lookup, grants, policy alias
#   list, credential load, the PostgreSQL arms of the store, the rare operations in
#   dispatch): every nesting level moved the whole future (memcpy was 6.7% of
#   instructions, now 3.2%). Strict's 150 us COMMIT_GATHER delay was A/B-tested in one
#   binary (16c: 64.2/64.5 us with, 63.6/63.5 without; 64c: 44.3/45.9 vs 46.1/43.8; req/s
#   the same) and dropped. Strict still pays ~20-25 us more than bounded at 16c: per group
#   one Ed25519 signature in the writer, one on the checkpoint thread, the WAL fsync.
#
# Figures (2026-12-06 07:49 UTC, this machine QUIET: load average 2.6 at the start, 3.2 at
# the end; lead, HEAD 3023be7 with h/kmstail; `COSMIAN_BIN=/work/.cache/cosmian/bin/cosmian_kms
# CAAS_BIN=/work/target-rel/release/caas SECS=10 ROUNDS=2 bench/kms-bench.sh`). This run's
# machine was slower than earlier ones (GET /healthz 102 k / 93 k req/s; Cosmian 22-28 k):
#   cell                 bounded ratio (p99 ms)  strict ratio (p99 ms)  CPU us/req caas b/s vs cosmian
#   Encrypt 64B  16c     1.49 (4.73)             0.95 (2.54)            38.2 / 59.3 vs 66.2
#   Encrypt 64B  64c     1.41 (17.43)            1.17 (6.72)            38.0 / 46.4 vs 60.7
#   Encrypt 1KiB 16c     2.30 (4.35)             1.35 (3.09)            43.3 / 71.5 vs 127.1
#   Encrypt 1KiB 64c     2.47 (7.43)             1.98 (7.85)            43.8 / 53.9 vs 131.8
#   Decrypt 64B  16c     1.50 (4.14)             0.94 (2.39)            37.3 / 56.2 vs 63.2
#   Decrypt 64B  64c     1.20 (7.16)             1.05 (6.09)            40.6 / 47.3 vs 56.2
#   Server CPU per request fell from ~52 to ~38 us (bounded) since the 04:25 run; the goal
#   (>= 1.5x everywhere, strict >= 1.0x, p99 < 3 ms at 64c) is still not met: the p99 at 64
#   connections follows the harness's own floor (GET /healthz p99 3.25 ms at 64c here).
#
# Figures (2026-12-06 06:59 UTC, this machine LOADED: load average 5.5 at the start, 7.3
# at the end; release caas of h/kmstail (D below); `COSMIAN_BIN=… CAAS_BIN=… SECS=5
# ROUNDS=1 bench/kms-bench.sh`), req/s caas bounded | strict vs Cosmian, ratio bounded |
# strict, then server CPU per request caas bounded | strict vs Cosmian:
#   Encrypt 64B  16 conns  12951 | 10350 vs 11411   1.13 | 0.91   44.5 | 76.7 vs 65.6 us
#   Encrypt 64B  64 conns  18260 | 13993 vs 21787   0.84 | 0.64   46.2 | 58.4 vs 62.1 us
#   Encrypt 1KiB 16 conns  10000 |  9332 vs  8332   1.20 | 1.12   55.6 | 85.9 vs 131.2 us
#   Encrypt 1KiB 64 conns  11649 | 12685 vs  7762   1.50 | 1.63   57.7 | 63.1 vs 128.4 us
#   Decrypt 64B  16 conns   9916 | 11251 vs 13860   0.72 | 0.81   56.4 | 74.3 vs 61.4 us
#   Decrypt 64B  64 conns  14947 | 14604 vs 16099   0.93 | 0.91   47.7 | 55.2 vs 61.5 us
#   GET /healthz 42.0 k / 41.4 k req/s, p50/p99 0.29/6.03 ms (16 conns), 1.08/15.71 ms (64):
#   at this load even the harness's floor is far above 3 ms, so these p99s (caas 8.7–31 ms,
#   Cosmian 9.4–30 ms) and ratios say nothing; the lead's quiet re-run decides.
#
# Figures (2026-12-06 06:04–06:55 UTC, this machine LOADED: load average 6–14 from other
# builds, disk stalls included; req/s and p99 are noise at that load, only server CPU per
# request is indicative; own harness with the same wrk -t2 and SigV4-signed bodies, 6–8 s
# per cell, release caas of main (A) against h/kmstail (B: 4 ms bounded groups, request id
# without getrandom, SigV4 canonical request and last-usage update without temporaries;
# D: B + policy verdict without unread condition keys, replies without core::fmt, audit
# INSERT prepared once per group, strict commit delay), alternating A/B or A/D runs).
# Server CPU per request, A → B/D in pairs run back to back:
#   bounded Encrypt 64B 16 conns  69.4 → 52.2, 58.4 → 52.7 (B); 52.1 → 51.8, 63.0 → 47.2 (D)
#   bounded Decrypt 64B 64 conns  54.4 → 50.2, 56.2 → 49.2 (B); 51.8 → 63.1, 59.6 → 46.4 (D)
#   bounded Decrypt 64B 16 conns  49.1 → 46.2, 65.3 → 56.1, 64.6 → 63.2 (D)
#   strict  Decrypt 64B 16 conns  88.7 → 88.0, 84.3 → 75.9, 85.0 → 99.4, 111.8 → 102.3,
#                                 89.9 → 79.6 (D)
# i.e. bounded about 8–10% less CPU per request (the goal needs ~15–20% more: 1.5x needs
# caas at ≤ ~40 us where Cosmian costs 62–70 us, wrk's own share included); strict not
# resolved by these samples. Where a bounded Encrypt's CPU goes (perf record --call-graph
# dwarf on B, 16 conns): hyper + tokio + the kernel's loopback TCP (the reply's writev
# delivers into wrk's socket and wakes it in our thread: ~20%) is the largest block and
# is what GET /healthz costs too (10–11 us/req); the store writer 19.8% (was 22.5% at
# 2 ms: COMMIT with its fsync ~10%, the INSERTs ~5%, cross-thread frees of the records
# ~1.3%); kms_endpoint 27% spread thin (dispatch 8.7% — seal 2.9%, policy 2.7% —, SigV4
# 4.5% + 1.4% parsing, the reply's JSON 1.6%, the per-request UUID 0.8%); the audit
# checkpoint thread 2.3%; hyper's 8 KiB read buffer is re-allocated per request (a large
# malloc that makes glibc consolidate: ~2.5%; glibc tunables mxfast=0 / tcache_count did
# not help). p99: on a loaded machine the bounded tail is disk stalls — once the oldest
# queued record is 7 ms old, requests wait for durability (back-pressure, by design), so
# an fsync stalled by other writers' I/O becomes request latency; on a quiet machine the
# 64-conn tail (~3x the mean, Cosmian's shape too) is CPU oversubscription: 2 tokio
# workers, the writer and wrk's 2 threads on 2 CPUs, a preempted worker's connections wait
# for its next slice (no stealing while the other worker is busy). The summary now prints
# GET /healthz's p50/p99: the harness's own floor, to compare the KMS p99 against.
#
# Figures (2026-12-06 04:25 UTC, this machine QUIET: load average 1.6 at the start, 3.7 at
# the end; release caas of main with the 2 ms bounded group gathering; `COSMIAN_BIN=… CAAS_BIN=…
# SECS=10 ROUNDS=2 bench/kms-bench.sh`), req/s caas bounded | strict vs Cosmian, ratio
# bounded | strict, then server CPU per request caas bounded | strict vs Cosmian:
#   Encrypt 64B  16 conns  26870 | 21256 vs 21146   1.27 | 1.01   51.0 | 63.0 vs 69.4 us
#   Encrypt 64B  64 conns  29742 | 21944 vs 20978   1.42 | 1.05   46.7 | 61.5 vs 71.3 us
#   Encrypt 1KiB 16 conns  26822 | 17126 vs 11552   2.32 | 1.48   51.8 | 77.6 vs 142.3 us
#   Encrypt 1KiB 64 conns  26212 | 20831 vs 11672   2.25 | 1.78   54.2 | 65.8 vs 140.9 us
#   Decrypt 64B  16 conns  29904 | 16904 vs 22662   1.32 | 0.75   45.3 | 77.8 vs 64.7 us
#   Decrypt 64B  64 conns  33463 | 23908 vs 22742   1.47 | 1.05   41.0 | 56.1 vs 65.7 us
#   HTTP ceiling 87.4 k (16 conns) / 97.0 k (64); caas at 0.19–0.34 of it. p99 at 64 conns:
#   caas bounded 6.4–7.3 ms, strict 8.0–8.8 ms, Cosmian 7.4–10.9 ms (goal < 3 ms not met);
#   at 16 conns caas strict 2.5–3.0 ms, bounded 3.6–3.9 ms. Goals: bounded ≥ 1.5× met for
#   Encrypt 1KiB only (64B cells 1.27–1.47); strict ≥ 1.0× met except Decrypt 64B at 16
#   conns (0.75: small group commits, ~25–35 us more CPU per request than bounded).
#
# Figures (2026-12-06 03:39–03:43 UTC, this machine LOADED: load average 8.4–12.5 from
# other builds, so req/s ratios are noise; SECS=5 ROUNDS=1, the same script and Cosmian
# binary, caas release builds of main (before) and of h/kmsfast (after: the SQLite writer
# gathers bounded key-use records for up to 2 ms per group commit; no entry clone per
# request). Server CPU per request, caas before → after (Cosmian in the same run), and the
# CPU ratio Cosmian/caas after:
#   bounded  Encrypt 64B  16 conns  86.6 → 45.7 us (Cosmian 66.4)   1.45
#            Encrypt 64B  64 conns  61.0 → 44.6 us (65.9)           1.48
#            Encrypt 1KiB 16 conns  73.9 → 55.7 us (137.5)          2.47
#            Encrypt 1KiB 64 conns  63.8 → 65.4 us (148.1)          2.26
#            Decrypt 64B  16 conns  62.7 → 45.4 us (64.2)           1.41
#            Decrypt 64B  64 conns  58.6 → 52.3 us (69.7)           1.33
#   strict   Encrypt 64B  16 / 64   81.6 / 62.9 → 77.7 / 64.2 us (66.4 / 65.9)   0.85 / 1.03
#            Encrypt 1KiB 16 / 64   88.0 / 65.9 → 87.0 / 74.5 us (137.5 / 148.1) 1.58 / 1.99
#            Decrypt 64B  16 / 64   81.8 / 60.6 → 78.9 / 64.1 us (64.2 / 69.7)   0.81 / 1.09
#   Bounded now costs about 45–55 us of server CPU per small request against Cosmian's
#   64–70; strict still pays ~25–35 us more per request than bounded at 16 connections
#   (small groups: each group commit costs BEGIN, head read, one Ed25519 group signature,
#   the WAL fsync — which burns CPU on this VM's virtio disk — and a checkpoint signature
#   on its own thread). In a perf profile of bounded Encrypt 64B after the change
#   (perf record --call-graph dwarf, 16 conns) the writer thread fell from ~28% to ~19% of
#   caas's samples; the rest: kms_endpoint ~33% (SigV4 ~6%, dispatch ~10%, JSON ~5%),
#   the reply's loopback TCP send ~20%, glibc malloc/free ~15% (mimalloc was tried and
#   dropped: the crypto domain, the same binary, hangs after mlockall(MCL_FUTURE) under it).
#   Goals still to confirm on a quiet machine (req/s ≥ 1.5× for bounded); strict at parity
#   needs cheaper group commits (see above), p99 < 3 ms at 64 conns is not met.
#
# Before this change:
# Figures (2026-12-06 01:42 UTC, this machine QUIET: load average 0.14 at the start; caas
# release build of main after the key-use cache (keycache.rs) and the task-free deferred
# audit; `COSMIAN_BIN=/work/.cache/cosmian/bin/cosmian_kms CAAS_BIN=… SECS=10 ROUNDS=2
# bench/kms-bench.sh`), req/s caas bounded | strict vs Cosmian, ratio bounded | strict:
#   Encrypt 64B  16 conns  22927 | 20681 vs 21336   1.07 | 0.97
#   Encrypt 64B  64 conns  20978 | 25423 vs 22360   0.94 | 1.14
#   Encrypt 1KiB 16 conns  19984 | 17834 vs 11381   1.76 | 1.57
#   Encrypt 1KiB 64 conns  20735 | 23404 vs 10808   1.92 | 2.17
#   Decrypt 64B  16 conns  19242 | 21926 vs 23098   0.83 | 0.95
#   Decrypt 64B  64 conns  27023 | 26728 vs 23805   1.14 | 1.12
#   caas's HTTP ceiling (GET /healthz) 94.6 k (16 conns) / 78.9 k (64); caas at 0.19–0.34
#   of it. p99 at 64 conns: caas 7.2–9.2 ms, Cosmian 7.3–14.7 ms (goal < 3 ms not met);
#   p99 at 16 conns caas strict 2.5–3.0 ms, bounded 4.6–4.9 ms.
#   Before the key-use cache, same quiet machine (2026-12-05): Encrypt 64B 16445 | 17290
#   (0.68 | 0.72) at 16 conns, 19272 | 22072 (0.86 | 0.98) at 64; Decrypt 64B 0.71 | 0.69
#   and 0.74 | 0.95. Bounded is still not reliably faster than strict: both are CPU-bound
#   per request. Where a request's CPU went before the cache (perf record --call-graph
#   dwarf on the release caas under wrk, Encrypt 64B, 16 conns): the key row read + MAC +
#   JSON parse + EKT open ~14% (now cached), the audit writer thread ~18% (SQLite insert,
#   WAL, fsync, one Ed25519 signature per group), sending the reply (loopback TCP, kernel)
#   ~17%, SigV4 ~9%, request/response JSON through serde_json::Value ~5%, malloc/free ~9%.
#   Goal (≥ 1.5× for bounded, ≥ 1.0× for strict, p99 < 3 ms at 64 connections) met only
#   for Encrypt 1 KiB; next: typed request parsing instead of serde_json::Value, fewer
#   allocations, larger deferred audit groups.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
read -ra CONNS <<< "${CONNS:-16 64}"
read -ra MODES <<< "${MODES:-bounded strict}"
CELLS=" ${CELLS:-enc64 enc1k dec64} "
want() { [[ "$CELLS" == *" $1 "* ]]; }
COSMIAN_VERSION=5.28.0
COSMIAN_CACHE=${COSMIAN_CACHE:-$HOME/.cache/caas-bench/cosmian}
PY=${PY:-$REPO/.venv/bin/python3}
for t in wrk curl; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install wrk curl" >&2; exit 1; }
done
"$PY" -c 'import botocore' 2>/dev/null || { echo "missing botocore: scripts/install-deps (creates .venv)" >&2; exit 1; }

# --- the binaries ----------------------------------------------------------------------
if [[ -z "${CAAS_BIN:-}" ]]; then
  cargo build --release -q -p caas --bin caas
  CAAS_BIN=${CARGO_TARGET_DIR:-target}/release/caas
fi
PEER=${PEER:-cosmian}
if [[ "$PEER" == none ]]; then
  COSMIAN_BIN=/bin/true
elif [[ -z "${COSMIAN_BIN:-}" ]]; then
  COSMIAN_BIN=$COSMIAN_CACHE/bin/cosmian_kms
  if [[ ! -x "$COSMIAN_BIN" ]]; then
    pkg-config --exists openssl 2>/dev/null || { echo "building the peer needs OpenSSL headers: apt-get install libssl-dev pkg-config" >&2; exit 1; }
    echo "building cosmian_kms_server $COSMIAN_VERSION (once, cached in $COSMIAN_CACHE; slow)" >&2
    mkdir -p "$COSMIAN_CACHE"
    if ! cargo install --locked cosmian_kms_server --version "$COSMIAN_VERSION" --features non-fips \
        --root "$COSMIAN_CACHE" --target-dir "$COSMIAN_CACHE/target" 2> "$COSMIAN_CACHE/install.log"; then
      # 5.28.0's `non-fips` feature names a dev-dependency (cosmian_kms_client_utils), which
      # `cargo install` cannot resolve: patch the unpacked crate (outside this repository).
      src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cosmian_kms_server-"$COSMIAN_VERSION" | head -1)
      [[ -d "$src" ]] || { cat "$COSMIAN_CACHE/install.log" >&2; exit 1; }
      rm -rf "$COSMIAN_CACHE/src" && mkdir -p "$COSMIAN_CACHE/src" && cp -a "$src" "$COSMIAN_CACHE/src/"
      patched=$COSMIAN_CACHE/src/cosmian_kms_server-$COSMIAN_VERSION
      sed -i '/^non-fips = \[/,/^\]/{/cosmian_kms_client_utils\/non-fips/d}' "$patched/Cargo.toml"
      cargo install --locked --path "$patched" --features non-fips \
        --root "$COSMIAN_CACHE" --target-dir "$COSMIAN_CACHE/target"
    fi
  fi
fi
[[ -x "$CAAS_BIN" ]] || { echo "no caas binary at $CAAS_BIN" >&2; exit 1; }
[[ -x "$COSMIAN_BIN" ]] || { echo "no cosmian_kms binary at $COSMIAN_BIN" >&2; exit 1; }

W=${WORKDIR:-$(mktemp -d /var/tmp/caas-kms-bench.XXXXXX)}
mkdir -p "$W"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n "${KEEP:-}" ]] || rm -rf "$W"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 600); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

# --- Cosmian ---------------------------------------------------------------------------
CPORT=$(free_port)
P64=$(head -c 64 /dev/urandom | od -An -tx1 -v | tr -d ' \n' | tr a-f A-F)
P1K=$(head -c 1024 /dev/urandom | od -An -tx1 -v | tr -d ' \n' | tr a-f A-F)
declare -A RES
if [[ "$PEER" != none ]]; then
mkdir -p "$W/cosmian"
RUST_LOG=warn "$COSMIAN_BIN" --database-type sqlite --sqlite-path "$W/cosmian" \
  --hostname 127.0.0.1 --port "$CPORT" > "$W/cosmian.log" 2>&1 &
PIDS+=($!)
wait_port "$CPORT"
CURL_KMIP=(curl -sS -X POST -H 'Content-Type: application/json' "http://127.0.0.1:$CPORT/kmip/2_1")
NOW=$(date -u -d '1 minute ago' +%Y-%m-%dT%H:%M:%S.000Z)
create='{"tag":"Create","type":"Structure","value":[
 {"tag":"ObjectType","type":"Enumeration","value":"SymmetricKey"},
 {"tag":"Attributes","type":"Structure","value":[
  {"tag":"CryptographicAlgorithm","type":"Enumeration","value":"AES"},
  {"tag":"CryptographicLength","type":"Integer","value":256},
  {"tag":"CryptographicUsageMask","type":"Integer","value":2108},
  {"tag":"ActivationDate","type":"DateTime","value":"'"$NOW"'"},
  {"tag":"KeyFormatType","type":"Enumeration","value":"TransparentSymmetricKey"},
  {"tag":"ObjectType","type":"Enumeration","value":"SymmetricKey"}]}]}'
CKEY=$("${CURL_KMIP[@]}" -d "$create" | "$PY" -c '
import json,sys
r=json.load(sys.stdin)
print(next(v["value"] for v in r["value"] if v["tag"]=="UniqueIdentifier"))')
cosmian_encrypt_body() { # $1: plaintext as upper-case hex
  printf '{"tag":"Encrypt","type":"Structure","value":[{"tag":"UniqueIdentifier","type":"TextString","value":"%s"},{"tag":"CryptographicParameters","type":"Structure","value":[{"tag":"BlockCipherMode","type":"Enumeration","value":"GCM"}]},{"tag":"Data","type":"ByteString","value":"%s"}]}' "$CKEY" "$1"
}
cosmian_encrypt_body "$P64" > "$W/c-enc64.json"
cosmian_encrypt_body "$P1K" > "$W/c-enc1k.json"
# Decrypt: the Encrypt response's Data, IVCounterNonce and AuthenticatedEncryptionTag.
"${CURL_KMIP[@]}" --data-binary @"$W/c-enc64.json" > "$W/c-enc64.out"
"$PY" - "$W/c-enc64.out" "$CKEY" > "$W/c-dec64.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
f = {v["tag"]: v["value"] for v in r["value"]}
def find(*names):
    for n in names:
        if n in f:
            return f[n]
    sys.exit(f"Cosmian Encrypt answered no {names}: {r}")
value = [
    {"tag": "UniqueIdentifier", "type": "TextString", "value": sys.argv[2]},
    {"tag": "CryptographicParameters", "type": "Structure",
     "value": [{"tag": "BlockCipherMode", "type": "Enumeration", "value": "GCM"}]},
    {"tag": "Data", "type": "ByteString", "value": find("Data")},
    {"tag": "IVCounterNonce", "type": "ByteString", "value": find("IVCounterNonce", "IvCounterNonce")},
    {"tag": "AuthenticatedEncryptionTag", "type": "ByteString", "value": find("AuthenticatedEncryptionTag")},
]
print(json.dumps({"tag": "Decrypt", "type": "Structure", "value": value}))
EOF
for b in enc64 enc1k dec64; do
  out=$("${CURL_KMIP[@]}" --data-binary @"$W/c-$b.json")
  case "$out" in *'"Data"'*) ;; *) echo "Cosmian $b failed: $out" >&2; exit 1 ;; esac
done
fi

# --- caas ------------------------------------------------------------------------------
KPORT=$(free_port)
start_caas() { # $1: audit durability
  CAAS_LOG=warn RUST_LOG=warn "$CAAS_BIN" dev --data-dir "$W/caas" --listen "127.0.0.1:$KPORT" \
    --audit-durability "$1" > "$W/caas-$1.log" 2>&1 &
  CAAS_PID=$!
  PIDS+=($CAAS_PID)
  for _ in $(seq 1 600); do
    [[ -s "$W/caas/env" ]] && (echo > "/dev/tcp/127.0.0.1/$KPORT") 2>/dev/null && return 0
    kill -0 "$CAAS_PID" 2>/dev/null || { cat "$W/caas-$1.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "caas dev did not start" >&2; exit 1
}
stop_caas() {
  kill -TERM "$CAAS_PID" 2>/dev/null || true
  wait "$CAAS_PID" 2>/dev/null || true
  rm -f "$W/caas/env"
}

# Writes a wrk script replaying one request (signed now for caas) and printing
# "WRK rps p50_us p99_us non2xx socket_errors" at the end.
lua_for() { # $1 out.lua, $2 kind: caas-Op | cosmian | healthz, $3 body file
  "$PY" - "$@" "$W/caas/env" "$KPORT" "$CPORT" <<'EOF'
import json, sys
out, kind, body_file, envf, kport, cport = sys.argv[1:7]
body = open(body_file, "rb").read().decode() if body_file != "-" else ""
method, headers = "POST", {}
if kind.startswith("caas-"):
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    env = {}
    for line in open(envf):
        line = line.strip().removeprefix("export ")
        if "=" in line:
            k, v = line.split("=", 1)
            env[k] = v.strip("'\"")
    host = f"127.0.0.1:{kport}"
    req = AWSRequest(method="POST", url=f"http://{host}/", data=body.encode(), headers={
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService." + kind.removeprefix("caas-"),
        "Host": host,
    })
    SigV4Auth(Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), "kms",
              env.get("AWS_DEFAULT_REGION", "us-east-1")).add_auth(req)
    headers = dict(req.headers.items())
elif kind == "cosmian":
    headers = {"Content-Type": "application/json"}
else:
    method = "GET"
lua = [f"wrk.method = {json.dumps(method)}", f"wrk.body = {json.dumps(body)}"]
for k, v in headers.items():
    lua.append(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
lua.append("""
done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  io.write(string.format("WRK %.1f %d %d %d %d %d\\n", summary.requests / secs,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end""")
open(out, "w").write("\n".join(lua) + "\n")
EOF
}

# The server's CPU time so far (user + system, clock ticks) from /proc.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Runs one cell ROUNDS times against the server process $5; prints "rps p50_us p99_us
# cpu_us" of the best round, cpu_us being the server's CPU time (all its threads, user +
# system) per request: unlike req/s, it hardly depends on what else the machine runs.
run_cell() { # $1 url, $2 lua, $3 connections, $4 label, $5 server pid
  local best="0 0 0 0" r t0 t1 cpu
  for _ in $(seq 1 "$ROUNDS"); do
    t0=$(cpu_ticks "$5")
    r=$(wrk -t"$THREADS" -c"$3" -d"${SECS}s" -s "$2" "$1" | awk '/^WRK /{print $2, $3, $4, $5, $6, $7}')
    t1=$(cpu_ticks "$5")
    read -r rps p50 p99 bad errs n <<< "$r"
    if [[ "$bad" != 0 || "$errs" != 0 ]]; then
      echo "cell $4: $bad non-2xx answers, $errs socket errors" >&2; exit 1
    fi
    cpu=$(awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$HZ" 'BEGIN{printf "%.1f", (n > 0 ? (b-a)*1e6/hz/n : 0)}')
    if awk -v a="$rps" -v b="${best%% *}" 'BEGIN{exit !(a>b)}'; then best="$rps $p50 $p99 $cpu"; fi
  done
  printf '  %-44s %9.0f req/s  p50 %6.2f ms  p99 %6.2f ms  server CPU %6.1f us/req\n' "$4" "${best%% *}" \
    "$(awk -v x="$(cut -d' ' -f2 <<< "$best")" 'BEGIN{print x/1000}')" \
    "$(awk -v x="$(cut -d' ' -f3 <<< "$best")" 'BEGIN{print x/1000}')" \
    "$(cut -d' ' -f4 <<< "$best")" >&2
  echo "$best"
}
HZ=$(getconf CLK_TCK)

b64() { "$PY" -c 'import base64,sys; print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode())' "$1"; }
echo "kms-bench: load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs, SECS=$SECS ROUNDS=$ROUNDS, wrk -t$THREADS" >&2
[[ "$PEER" == none ]] || echo "Cosmian KMS $COSMIAN_VERSION (KMIP 2.1 JSON, SQLite, no auth):" >&2
for c in "${CONNS[@]}"; do
  [[ "$PEER" != none ]] || { RES[cos,enc64,$c]="0 0 0 0"; RES[cos,enc1k,$c]="0 0 0 0"; RES[cos,dec64,$c]="0 0 0 0"; continue; }
  want enc64 && lua_for "$W/c.lua" cosmian "$W/c-enc64.json" && RES[cos,enc64,$c]=$(run_cell "http://127.0.0.1:$CPORT/kmip/2_1" "$W/c.lua" "$c" "Encrypt 64B $c conns" "${PIDS[0]}")
  want enc1k && lua_for "$W/c.lua" cosmian "$W/c-enc1k.json" && RES[cos,enc1k,$c]=$(run_cell "http://127.0.0.1:$CPORT/kmip/2_1" "$W/c.lua" "$c" "Encrypt 1KiB $c conns" "${PIDS[0]}")
  want dec64 && lua_for "$W/c.lua" cosmian "$W/c-dec64.json" && RES[cos,dec64,$c]=$(run_cell "http://127.0.0.1:$CPORT/kmip/2_1" "$W/c.lua" "$c" "Decrypt 64B $c conns" "${PIDS[0]}")
done
[[ "$PEER" == none ]] || kill "${PIDS[0]}" 2>/dev/null || true

for mode in "${MODES[@]}"; do
  start_caas "$mode"
  if [[ ! -s "$W/k-key" ]]; then
    # One key and one ciphertext (of a 64-byte plaintext) for every cell, through boto3.
    (set -a; . "$W/caas/env"; set +a; "$PY" - "$W" "$(b64 "$P64")" <<'EOF'
import base64, boto3, json, os, sys
w, p64 = sys.argv[1], sys.argv[2]
kms = boto3.client("kms", endpoint_url=os.environ["CAAS_KMS_ENDPOINT"],
                   region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
key = kms.create_key()["KeyMetadata"]["KeyId"]
ct = kms.encrypt(KeyId=key, Plaintext=base64.b64decode(p64))["CiphertextBlob"]
open(f"{w}/k-key", "w").write(key)
open(f"{w}/k-dec64.json", "w").write(json.dumps({"CiphertextBlob": base64.b64encode(ct).decode()}))
EOF
    )
    KKEY=$(cat "$W/k-key")
    printf '{"KeyId":"%s","Plaintext":"%s"}' "$KKEY" "$(b64 "$P64")" > "$W/k-enc64.json"
    printf '{"KeyId":"%s","Plaintext":"%s"}' "$KKEY" "$(b64 "$P1K")" > "$W/k-enc1k.json"
  fi
  echo "caas ($mode audit durability, SigV4 on every request):" >&2
  for c in "${CONNS[@]}"; do
    if [[ -z "${RES[health,$c]:-}" ]]; then
      lua_for "$W/k.lua" healthz -; RES[health,$c]=$(run_cell "http://127.0.0.1:$KPORT/healthz" "$W/k.lua" "$c" "GET /healthz $c conns (HTTP ceiling)" "$CAAS_PID")
    fi
    want enc64 && lua_for "$W/k.lua" caas-Encrypt "$W/k-enc64.json" && RES[$mode,enc64,$c]=$(run_cell "http://127.0.0.1:$KPORT/" "$W/k.lua" "$c" "Encrypt 64B $c conns" "$CAAS_PID")
    want enc1k && lua_for "$W/k.lua" caas-Encrypt "$W/k-enc1k.json" && RES[$mode,enc1k,$c]=$(run_cell "http://127.0.0.1:$KPORT/" "$W/k.lua" "$c" "Encrypt 1KiB $c conns" "$CAAS_PID")
    want dec64 && lua_for "$W/k.lua" caas-Decrypt "$W/k-dec64.json" && RES[$mode,dec64,$c]=$(run_cell "http://127.0.0.1:$KPORT/" "$W/k.lua" "$c" "Decrypt 64B $c conns" "$CAAS_PID")
  done
  stop_caas
done

echo "kms-bench: load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
for c in "${CONNS[@]}"; do
  read -r h hp50 hp99 _ <<< "${RES[health,$c]}"
  # Its p99 is the latency floor of this harness on this machine (no KMS work at all):
  # a KMS p99 goal below it is out of reach here whatever the server does.
  printf 'kms-bench: caas HTTP ceiling (GET /healthz) %s clients: %.0f req/s, p50/p99 %.2f/%.2f ms\n' \
    "$c" "$h" "$(awk -v x="$hp50" 'BEGIN{print x/1000}')" "$(awk -v x="$hp99" 'BEGIN{print x/1000}')"
done
for cell in "enc64:Encrypt 64B" "enc1k:Encrypt 1KiB" "dec64:Decrypt 64B"; do
  k=${cell%%:*}; name=${cell#*:}
  for c in "${CONNS[@]}"; do
    for mode in "${MODES[@]}"; do
      [[ -n "${RES[$mode,$k,$c]:-}" ]] || continue
      read -r crps cp50 cp99 ccpu <<< "${RES[$mode,$k,$c]}"
      read -r orps op50 op99 ocpu <<< "${RES[cos,$k,$c]:-0 0 0 0}"
      read -r h _ <<< "${RES[health,$c]}"
      awk -v n="$name" -v c="$c" -v m="$mode" -v a="$crps" -v b="$orps" -v h="$h" \
          -v ap50="$cp50" -v ap99="$cp99" -v bp50="$op50" -v bp99="$op99" \
          -v acpu="$ccpu" -v bcpu="$ocpu" 'BEGIN{
        printf "kms-bench: %s %s clients (%s): caas %.0f req/s, cosmian %.0f req/s, ratio %s\n", n, c, m, a, b, (b > 0 ? sprintf("%.2f", a/b) : "n/a")
        printf "kms-bench:   p50/p99 caas %.2f/%.2f ms, cosmian %.2f/%.2f ms; caas at %.2f of its HTTP ceiling\n", ap50/1000, ap99/1000, bp50/1000, bp99/1000, a/h
        printf "kms-bench:   server CPU per request caas %.1f us, cosmian %.1f us, ratio %s\n", acpu, bcpu, (acpu > 0 && bcpu > 0 ? sprintf("%.2f", bcpu/acpu) : "n/a")
      }'
    done
  done
done
