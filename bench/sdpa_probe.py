"""Probe: SDPA backends for paged prefill on this GPU - cost of the first call at a new shape (plan build)
and the steady time. Llama-3.1-8B attention shapes (32 q heads, 8 kv heads, head dim 128, bf16)."""
import json, random, statistics, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

dev = torch.device("cuda")
H, KVH, D = 32, 8, 128
rng = random.Random(0)
out = {}
for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
    be = getattr(SDPBackend, name)
    res = {}
    for kind in ("causal", "lower_right"):
        firsts, seconds, err = [], [], None
        for i in range(12):
            L = rng.randint(17, 900)
            S = L if kind == "causal" else L + rng.randint(16, 600)
            q = torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, KVH, S, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            kw = dict(is_causal=True) if kind == "causal" else dict(attn_mask=causal_lower_right(L, S))
            try:
                with sdpa_kernel([be]):
                    for rep in range(2):
                        torch.cuda.synchronize(); t0 = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
                        torch.cuda.synchronize(); dt = 1e3 * (time.perf_counter() - t0)
                        (firsts if rep == 0 else seconds).append(dt)
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {str(e)[:160]}"
                break
        res[kind] = {"first_call_ms_median": statistics.median(firsts) if firsts else None,
                     "first_call_ms_max": max(firsts) if firsts else None,
                     "second_call_ms_median": statistics.median(seconds) if seconds else None, "error": err}
    # steady time at L = S = 2048 (CUDA events, median of 20)
    q = torch.randn(1, H, 2048, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, KVH, 2048, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    try:
        with sdpa_kernel([be]):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            ts = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True); b.record()
                b.synchronize(); ts.append(a.elapsed_time(b))
        res["causal_2048_ms"] = statistics.median(ts)
    except Exception as e:  # noqa: BLE001
        res["causal_2048_ms"] = f"{type(e).__name__}: {str(e)[:160]}"
    out[name] = res
    print(name, json.dumps(res), flush=True)
if len(sys.argv) > 1:
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": out},
              open(sys.argv[1], "w"), indent=1)
