/* Sequence hashes of a prompt's full blocks (DESIGN.md §4 block hashing), in one call.
 *
 * Why native: the router hashes every prompt it routes and every block it indexes. In Python
 * that is two xxh3 calls per block (~1.9 us per block, ~115 us for a 1,000-token prompt), the
 * largest single part of routing a request. xxh3 itself comes from the system's libxxhash
 * (Debian libxxhash0), the library the `xxhash` Python package wraps; only the loop is ours.
 *
 * Byte order: token ids are read as little-endian uint32 and the (parent, local) pair as two
 * little-endian uint64, so the caller uses this only on little-endian machines.
 */
#include <stddef.h>
#include <stdint.h>

/* From libxxhash (xxhash.h is not needed for one declaration; XXH64_hash_t is uint64). */
uint64_t XXH3_64bits_withSeed(const void *data, size_t len, uint64_t seed);

/* out[i] = seq_hash of block i. has_parent = 0 starts a chain (seq_hash[0] = local_hash[0]);
 * has_parent = 1 continues the chain after `parent`. */
void tandem_block_hashes(const uint32_t *tokens, int64_t num_blocks, int64_t block_size,
                         uint64_t seed, uint64_t parent, int32_t has_parent, uint64_t *out) {
    const size_t block_bytes = (size_t)block_size * sizeof(uint32_t);
    uint64_t pair[2];
    for (int64_t i = 0; i < num_blocks; i++) {
        uint64_t local = XXH3_64bits_withSeed(tokens + i * block_size, block_bytes, seed);
        if (has_parent) {
            pair[0] = parent;
            pair[1] = local;
            parent = XXH3_64bits_withSeed(pair, sizeof(pair), seed);
        } else {
            parent = local;
            has_parent = 1;
        }
        out[i] = parent;
    }
}
