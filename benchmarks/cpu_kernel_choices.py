"""The measurements behind the CPU kernel choices of the builtin engine, in one run.

1. Decode attention at batch 64 (context 330, SmolLM2's 9/3 heads): the C paged-attention kernel
   vs gather + SDPA, one layer, float32 and bfloat16.
2. A prefill chunk with a cached prefix (512 queries over 1,024 keys, bf16): gather + SDPA, the
   decode kernel one query row at a time, and the AMX prefill kernel (where the CPU has AMX).
3. Decode steps of 1-64 rows on the real model (bf16): the fused C decoder (GEMV up to 4 rows,
   AMX tile multiplies above where the CPU has AMX) vs the per-op path.
4. oneDNN's packed bf16 weights at M = 64 and M = 2,048 for different packing hints (the model's
   120 layer matrices, LM head excluded).
5. The engine stepped on the main thread vs on a second thread after the main thread loaded the
   model (the OpenMP team effect tandem.worker.engine_host avoids), 64 decode tokens.

Usage: python benchmarks/cpu_kernel_choices.py
"""

from __future__ import annotations

import random
import threading
import time

import torch
import torch.nn.functional as F

import tandem.models.llama as llama
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.kernels import paged_attention as pa
from tandem.kernels import prefill_attention as pf
from tandem.models.layers.attention import bottom_right_causal_mask
from tandem.protocols.sampling_params import SamplingParams

HQ, HKV, D, BS = 9, 3, 64, 16


def timed_ms(fn, reps: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def decode_attention() -> None:
    n, ctx, nblocks = 64, 330, 4096
    for dtype in (torch.float32, torch.bfloat16):
        k, v = (torch.randn(nblocks * BS, HKV, D).to(dtype) for _ in range(2))
        maxb = -(-ctx // BS)
        table = torch.randperm(nblocks)[: n * maxb].view(n, maxb).contiguous()
        lens = torch.full((n,), ctx)
        q = torch.randn(n, HQ, D).to(dtype)
        mask = torch.zeros(n, 1, 1, maxb * BS, dtype=dtype).masked_fill_(
            (torch.arange(maxb * BS)[None] >= lens[:, None]).view(n, 1, 1, -1), float("-inf")
        )

        def sdpa():
            kd = k.view(-1, BS, HKV, D).index_select(0, table.view(-1)).view(n, maxb * BS, HKV, D)
            vd = v.view(-1, BS, HKV, D).index_select(0, table.view(-1)).view(n, maxb * BS, HKV, D)
            return F.scaled_dot_product_attention(
                q.view(n, HKV, HQ // HKV, D), kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=mask, scale=D**-0.5
            )

        rows = torch.arange(n)
        kernel = lambda: pa.paged_attention(q, k, v, table, rows, lens, BS, D**-0.5)
        print(f"  {dtype!s:15s} gather + SDPA {timed_ms(sdpa):6.2f} ms | C kernel {timed_ms(kernel):6.2f} ms")


def prefill_attention() -> None:
    n, cached, dtype = 512, 512, torch.bfloat16
    ctx = cached + n
    k, v = (torch.randn(4096 * BS, HKV, D).to(dtype) for _ in range(2))
    table = torch.randperm(4096)[: -(-ctx // BS)]
    q = torch.randn(n, HQ, D).to(dtype)
    pos = torch.arange(ctx)
    slots = table[pos // BS] * BS + pos % BS
    mask = bottom_right_causal_mask(n, ctx, torch.device("cpu"))

    def sdpa():
        kp, vp = k.index_select(0, slots), v.index_select(0, slots)
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            kp.transpose(0, 1)[None],
            vp.transpose(0, 1)[None],
            attn_mask=mask,
            scale=D**-0.5,
            enable_gqa=True,
        )

    tables, rows, lens = (
        table.view(1, -1).contiguous(),
        torch.zeros(n, dtype=torch.long),
        torch.arange(cached + 1, ctx + 1),
    )
    kernel = lambda: pa.paged_attention(q, k, v, tables, rows, lens, BS, D**-0.5)
    amx = "n/a (no AMX)"
    if pf.available():
        info, out = torch.tensor([[0, n, ctx]]), torch.empty_like(q)
        amx = f"{timed_ms(lambda: pf.prefill_attention(q, k, v, tables, info, BS, D**-0.5, out), 5):6.2f} ms"
    print(
        f"  {n} queries over {ctx} keys, bf16: gather + SDPA {timed_ms(sdpa, 5):6.2f} ms | "
        f"decode kernel per row {timed_ms(kernel, 5):6.2f} ms | AMX prefill kernel {amx}"
    )


def fused_by_rows(engine: LLMEngine) -> None:
    llama.FUSED_DECODE_MAX_ROWS = 64  # without AMX, let the GEMV fused path take every size measured here
    model, rng = engine.loaded.model, random.Random(0)
    model._fused = None
    for batch in (1, 2, 4, 8, 16, 64):
        for i in range(batch):
            engine.add_request(
                f"{batch}-{i}",
                [rng.randrange(100, 40000) for _ in range(256)],
                SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0),
            )
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
            engine.step()
        best = {}
        for mode in ("fused", "per-op", "fused", "per-op"):
            model._fused_off = mode == "per-op"
            best[mode] = min(best.get(mode, 1e9), timed_ms(engine.step, 8))
        print(f"  {batch} rows: fused {best['fused']:5.1f} ms | per-op {best['per-op']:5.1f} ms per step")
        for request_id in list(engine.requests):
            engine.abort_request(request_id)
    model._fused_off = False


def packing_hints() -> None:
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # qkv, o, gate_up, down (in, out)
    for hint in (16, 64, 128, 256, 1024):
        weights = [
            (i, torch.ops.mkldnn._reorder_linear_weight(torch.randn(o, i).bfloat16(), hint))
            for i, o in shapes
            for _ in range(30)
        ]
        figures = []
        for m in (64, 2048):
            xs = {i: torch.randn(m, i).bfloat16() for i, _ in shapes}
            figures.append(
                timed_ms(
                    lambda: [torch.ops.mkldnn._linear_pointwise(xs[i], w, None, "none", [], "") for i, w in weights], 3
                )
            )
        print(f"  hint {hint:4d}: M=64 {figures[0]:6.1f} ms | M=2048 {figures[1]:6.1f} ms")


def decode_ms_per_token(engine: LLMEngine) -> float:
    prompt = list(range(1000, 1256))
    engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    return (time.perf_counter() - start) / 64 * 1000


def main() -> None:
    print(f"{torch.get_num_threads()} threads")
    print("1. decode attention, batch 64, context 330, one layer")
    decode_attention()
    print("2. prefill chunk with a cached prefix")
    prefill_attention()
    engine = LLMEngine(EngineConfig(dtype="bfloat16", kv_cache_memory_gib=0.5))
    print("3. fused decoder (GEMV to 4 rows, AMX above where available) vs per-op path (bf16, context ~260)")
    fused_by_rows(engine)
    print("4. oneDNN packing hint (bf16, 120 matrices)")
    packing_hints()
    print("5. one decode stream, the engine stepped on (ms/token; per-op path, as before the fused decoder)")
    engine.loaded.model._fused_off = True
    main_ms = decode_ms_per_token(engine)
    result: dict[str, float] = {}
    worker = threading.Thread(target=lambda: result.setdefault("ms", decode_ms_per_token(engine)))
    worker.start()
    worker.join()
    print(f"  the main thread {main_ms:.1f} | a second thread {result['ms']:.1f}")


if __name__ == "__main__":
    main()
