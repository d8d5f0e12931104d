"""Probe: time the current solve on one Llama-2-7B-shaped block (synthetic statistics) on CUDA."""
import json, sys, time, os
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loradafast
from loradafast.stats import LayerStats, Statistics

def synth(H=4096, I=11008, T=2048, dev="cuda", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    def z(n):
        k = min(n, 2048)
        spec = torch.logspace(0, -6, k, device=dev, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(n, k, device=dev, dtype=torch.float64, generator=g))
        return ((q * spec) @ q.T).float() * T
    shapes = {"q": (H, H, "attn"), "k": (H, H, "attn"), "v": (H, H, "attn"), "o": (H, H, "o"),
              "gate": (H, I, "mlp"), "up": (H, I, "mlp"), "down": (I, H, "down")}
    zs = {}
    layers = {}
    for name, (fin, fout, key) in shapes.items():
        if key not in zs:
            zs[key] = z(fin)
        gs = torch.randn(fout, fin, device=dev, generator=g) * 1e-3
        ys = torch.rand(fout, device=dev, generator=g) * 1e-4 * T + 1e-8
        layers[name] = LayerStats(name, fin, fout, gs, ys, key)
    zs = {("q" if k == "attn" else "o" if k == "o" else "gate" if k == "mlp" else "down"): v for k, v in zs.items()}
    for l in layers.values():
        l.z_key = {"attn": "q", "o": "o", "mlp": "gate", "down": "down"}[l.z_key]
    return Statistics(layers, zs, T, 256, "diag", {})

def block_fb(T=2048, dev="cuda"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.bfloat16)
    for p in layer.parameters(): p.requires_grad_(False)
    rope = LlamaRotaryEmbedding(cfg).to(dev)
    x = torch.randn(2, T // 2, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T // 2, device=dev)[None].expand(2, -1)
    pe = rope(x, pos)
    def run():
        out = layer(x, position_embeddings=pe)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
    for _ in range(3): run()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): run()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / 10

res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
try:
    res["block_fwd_bwd_s"] = block_fb()
except Exception as e:
    res["block_err"] = repr(e)
stats = synth()
for dtype in (torch.float64, torch.float32):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        r = loradafast.solve(stats, 8, dtype=dtype)
        torch.cuda.synchronize()
        res[f"solve_{dtype}"] = {"s": time.perf_counter() - t, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "resid": max(l.diagnostics["residual"] for l in r.layers.values()),
            "iters": [l.diagnostics.get("eigensolver_iterations") for l in r.layers.values()],
            "fallback": [l.diagnostics.get("eigensolver_fallback") for l in r.layers.values()]}
    except Exception as e:
        res[f"solve_{dtype}"] = repr(e)
print(json.dumps(res, indent=1, default=str))
out = os.environ.get("OUT")
if out: Path(out, "probe.json").write_text(json.dumps(res, indent=1, default=str))
