/*
 * The data pattern and checksum shared by the kvmkit test init and the host
 * (kvmkit/guests/linux/pattern.py implements the same two functions).
 *
 * pattern(SEED): a byte stream. A 64-bit xorshift state starts at
 * SEED * 0x9E3779B97F4A7C15 + 1 (mod 2^64). For each 8-byte block of the
 * stream the state is first advanced once (x ^= x << 13; x ^= x >> 7;
 * x ^= x << 17), then its 8 bytes are the block, least significant first.
 *
 * fnv: FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
 */
#ifndef KVMKIT_PATTERN_H
#define KVMKIT_PATTERN_H

typedef unsigned long long pat_u64;

#define PATTERN_SEED_MUL 0x9E3779B97F4A7C15ULL
#define FNV64_OFFSET 0xcbf29ce484222325ULL
#define FNV64_PRIME 0x100000001b3ULL

struct pattern {
	pat_u64 x;          /* state of the current block */
	pat_u64 pos;        /* stream offset of the next byte */
};

static inline pat_u64 pattern_step(pat_u64 x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

/* A stream positioned at byte 0. */
static inline void pattern_init(struct pattern *p, pat_u64 seed)
{
	p->x = seed * PATTERN_SEED_MUL + 1;
	p->pos = 0;
}

/* The next len bytes of the stream into buf. */
static inline void pattern_fill(struct pattern *p, unsigned char *buf, pat_u64 len)
{
	pat_u64 i;

	for (i = 0; i < len; i++, p->pos++) {
		if ((p->pos & 7) == 0)
			p->x = pattern_step(p->x);
		buf[i] = (unsigned char)(p->x >> (8 * (p->pos & 7)));
	}
}

static inline pat_u64 fnv1a64_update(pat_u64 h, const unsigned char *buf, pat_u64 len)
{
	pat_u64 i;

	for (i = 0; i < len; i++) {
		h ^= buf[i];
		h *= FNV64_PRIME;
	}
	return h;
}

#endif
