/* The shared-memory collective's native half (executor/shm_allreduce.py has the protocol): publish
 * a rank's slot, wait for the other ranks' round counters, and sum the slots in rank order.
 *
 * The counters are read and written with acquire / release atomics, so a rank that sees a peer's
 * round also sees the slot that peer wrote before it, on any CPU. Sums add rank 0, 1, ..., n-1 in
 * that order on every rank, float32 in float32, bfloat16 widened to float32 and rounded once (to
 * nearest even, as torch rounds): the pragma below keeps the compiler from regrouping the
 * additions, which build.py's -fassociative-math would allow. ctypes drops the GIL around each
 * call, so a rank waiting here leaves its process's other threads free.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "simd.h"

#if defined(__clang__)
#pragma clang fp reassociate(off)
#elif defined(__GNUC__)
#pragma GCC optimize("no-associative-math")
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Copies this rank's part into its slot, then publishes round k (release: the copy first). */
void shm_put(void *slot, const void *src, int64_t nbytes, uint64_t *round, uint64_t k) {
    memcpy(slot, src, (size_t)nbytes);
    __atomic_store_n(round, k, __ATOMIC_RELEASE);
}

/* How many of the n round counters (one every `stride` words from `rounds`) still read `before`,
 * after spinning up to spin_ns for them to move; 0: every rank has published. */
int shm_wait(const uint64_t *rounds, int64_t stride, int n, uint64_t before, int64_t spin_ns) {
    int64_t deadline = -1;
    for (;;) {
        int missing = 0;
        for (int r = 0; r < n; r++)
            missing += __atomic_load_n(rounds + r * stride, __ATOMIC_ACQUIRE) == before;
        if (missing == 0) return 0;
        const int64_t now = now_ns();
        if (deadline < 0) deadline = now + spin_ns;
        if (now >= deadline) return missing;
        for (int i = 0; i < 16; i++) CPU_RELAX();
    }
}

/* out[i] = slot 0 + slot 1 + ... + slot n-1 at i, the slots `slot_bytes` apart from `bank`; in
 * blocks, so that each pass over a slot is a plain loop the compiler vectorises. */
enum { BLOCK = 512 };

void shm_sum_f32(const char *bank, int64_t slot_bytes, int n, float *out, int64_t count) {
    float acc[BLOCK];
    for (int64_t start = 0; start < count; start += BLOCK) {
        const int64_t m = count - start < BLOCK ? count - start : BLOCK;
        memcpy(acc, (const float *)bank + start, (size_t)m * sizeof *acc);
        for (int r = 1; r < n; r++) {
            const float *part = (const float *)(bank + r * slot_bytes) + start;
            for (int64_t i = 0; i < m; i++) acc[i] += part[i];
        }
        memcpy(out + start, acc, (size_t)m * sizeof *acc);
    }
}

/* widened[i] = the float32 of part[i] (a bf16 is the top half of its float32): a union, so the
 * loop stays a plain one that vectorises */
typedef union { float f[BLOCK]; uint32_t u[BLOCK]; } Widened;

static void widen(const uint16_t *part, int64_t m, Widened *w) {
    for (int64_t i = 0; i < m; i++) w->u[i] = (uint32_t)part[i] << 16;
}

void shm_sum_bf16(const char *bank, int64_t slot_bytes, int n, uint16_t *out, int64_t count) {
    Widened acc, part;
    for (int64_t start = 0; start < count; start += BLOCK) {
        const int64_t m = count - start < BLOCK ? count - start : BLOCK;
        widen((const uint16_t *)bank + start, m, &acc);
        for (int r = 1; r < n; r++) {
            widen((const uint16_t *)(bank + r * slot_bytes) + start, m, &part);
            for (int64_t i = 0; i < m; i++) acc.f[i] += part.f[i];
        }
        for (int64_t i = 0; i < m; i++) out[start + i] = bf16_bits(acc.f[i]);
    }
}
