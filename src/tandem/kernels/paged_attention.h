/* Shared between paged_attention.c and decode_forward.c (one library, tandem_attention). */
#ifndef TANDEM_PAGED_ATTENTION_H
#define TANDEM_PAGED_ATTENTION_H
#include <stdint.h>

/* Attention of one (row, kv head): q points at the group's query heads (contiguous, head_dim
 * each), the caches at this kv head's column, table at the row's block table; writes the
 * group's outputs to out. */
typedef void (*tandem_attention_item_f32)(const float *q, const float *k_cache, const float *v_cache,
                                          const int64_t *table, int64_t ctx, float *out, int64_t group,
                                          int64_t head_dim, int64_t slot_stride, int64_t block_size, float scale);
typedef void (*tandem_attention_item_bf16)(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                           const int64_t *table, int64_t ctx, float *out, int64_t group,
                                           int64_t head_dim, int64_t slot_stride, int64_t block_size, float scale);

tandem_attention_item_f32 tandem_attention_item_for_f32(int64_t head_dim);
tandem_attention_item_bf16 tandem_attention_item_for_bf16(int64_t head_dim);
#endif
