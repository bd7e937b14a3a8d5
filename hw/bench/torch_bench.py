#!/usr/bin/env python3
"""PyTorch peer of `disagg-hw bench-model`: the same shapes, timed the same way.

Prefill tokens/s by prompt length and decode tokens/s by batch size (decode at a fixed context,
a fixed number of steps, best of N repeats), for a Llama architecture with random weights. Uses
HF transformers' LlamaForCausalLM (eager attention, its own KV cache, logits of the last
position only, as its `generate` asks) when transformers is installed, else a plain PyTorch
Llama written below; the output says which. Every timed region starts and ends with
`torch.cuda.synchronize()` on a GPU, so it measures the GPU's work, not the host's queueing.

    python3 hw/bench/torch_bench.py --model smollm2-135m --device cpu --threads 16
    python3 hw/bench/torch_bench.py --model tinyllama-1.1b --device cuda --dtype bf16 --csv hf.csv
"""
import argparse
import inspect
import time

import torch

# Architecture numbers, as in models/src/spec.rs.
SPECS = {
    "smollm2-135m": dict(layers=30, hidden=576, inter=1536, heads=9, kv_heads=3, vocab=49152,
                         theta=100000.0, tied=True),
    "tinyllama-1.1b": dict(layers=22, hidden=2048, inter=5632, heads=32, kv_heads=4, vocab=32000,
                           theta=10000.0, tied=False),
    "llama-3.1-8b": dict(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256,
                         theta=500000.0, tied=False),
}


def hf_model(s, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], rope_theta=s["theta"],
        tie_word_embeddings=s["tied"], max_position_embeddings=8192,
        attn_implementation="eager", torch_dtype=dtype)
    model = LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()
    # Older transformers name it num_logits_to_keep; without either, prefill computes the
    # logits of every position.
    params = inspect.signature(model.forward).parameters
    keep = {name: 1 for name in ("logits_to_keep", "num_logits_to_keep") if name in params}

    def prefill(ids):
        return model(ids, use_cache=True, **keep)

    def step(out, token):
        return model(token, past_key_values=out.past_key_values, use_cache=True)

    return prefill, step


class PlainLlama(torch.nn.Module):
    """RMSNorm, RoPE (rotate half), GQA, SwiGLU, a concatenating KV cache."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        h, d = s["hidden"], s["hidden"] // s["heads"]
        self.d = d
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.embed = torch.nn.Embedding(s["vocab"], h)
        self.layers = torch.nn.ModuleList()
        for _ in range(s["layers"]):
            self.layers.append(torch.nn.ModuleDict(dict(
                q=lin(h, s["heads"] * d), k=lin(h, s["kv_heads"] * d), v=lin(h, s["kv_heads"] * d),
                o=lin(s["heads"] * d, h), gate=lin(h, s["inter"]), up=lin(h, s["inter"]),
                down=lin(s["inter"], h))))
        self.head = lin(h, s["vocab"])
        inv = 1.0 / (s["theta"] ** (torch.arange(0, d, 2).float() / d))
        self.register_buffer("inv", inv)

    @staticmethod
    def norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    def rope(self, x, pos):
        f = torch.outer(pos.float(), self.inv)
        cos, sin = torch.cat([f, f], -1).cos().to(x.dtype), torch.cat([f, f], -1).sin().to(x.dtype)
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, ids, cache=None):
        b, t = ids.shape
        start = 0 if cache is None else cache[0][0].shape[2]
        pos = torch.arange(start, start + t, device=ids.device)
        x = self.embed(ids)
        new_cache = []
        for i, l in enumerate(self.layers):
            y = self.norm(x)
            q = l["q"](y).view(b, t, -1, self.d).transpose(1, 2)
            k = l["k"](y).view(b, t, -1, self.d).transpose(1, 2)
            v = l["v"](y).view(b, t, -1, self.d).transpose(1, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if cache is not None:
                k = torch.cat([cache[i][0], k], 2)
                v = torch.cat([cache[i][1], v], 2)
            new_cache.append((k, v))
            rep = q.shape[1] // k.shape[1]
            att = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=t > 1)
            x = x + l["o"](att.transpose(1, 2).reshape(b, t, -1))
            y = self.norm(x)
            x = x + l["down"](torch.nn.functional.silu(l["gate"](y)) * l["up"](y))
        return self.head(self.norm(x)[:, -1]), new_cache


def plain_model(s, dtype, device):
    model = PlainLlama(s).to(dtype=dtype, device=device).eval()

    def prefill(ids):
        return model(ids)

    def step(out, token):
        return model(token, out[1])

    return prefill, step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", choices=sorted(SPECS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prompt-lens", default="128,512,2048")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="the plain PyTorch Llama, not HF's")
    p.add_argument("--csv", help="also write the rows as CSV here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = dict(f32=torch.float32, f16=torch.float16, bf16=torch.bfloat16)[a.dtype]
    s = SPECS[a.model]
    torch.manual_seed(0)
    impl = "plain PyTorch"
    if not a.plain:
        try:
            prefill, step = hf_model(s, dtype, a.device)
            impl = "HF transformers eager"
        except ImportError:
            prefill, step = plain_model(s, dtype, a.device)
    else:
        prefill, step = plain_model(s, dtype, a.device)
    print(f"{a.model} (random weights, {impl}, torch {torch.__version__}), {a.dtype} on "
          f"{a.device}, {torch.get_num_threads()} threads; decode at {a.context} tokens of "
          f"context, {a.steps} steps, best of {max(1, a.repeats)}")
    print("| phase | prompt tokens / batch | s per step | tokens/s |\n|---|---|---|---|")
    # Each row is written as it is measured, so a run cut short keeps what it measured.
    csv_file = open(a.csv, "w", buffering=1) if a.csv else None
    if csv_file:
        csv_file.write("phase,size,context_tokens,steps,step_s,tokens_per_s\n")

    def report(phase, size, context, steps, seconds, tokens):
        print(f"| {phase} | {size} | {seconds / steps:.6f} | {tokens / seconds:.1f} |", flush=True)
        if csv_file:
            csv_file.write(f"{phase},{size},{context},{steps},{seconds / steps:.9f},"
                           f"{tokens / seconds:.3f}\n")

    with torch.inference_mode():
        for n in [int(x) for x in a.prompt_lens.split(",")]:
            best = float("inf")
            for _ in range(max(1, a.repeats)):
                ids = torch.randint(0, s["vocab"], (1, n), device=a.device)
                sync(a.device)
                t0 = time.perf_counter()
                prefill(ids)
                sync(a.device)
                best = min(best, time.perf_counter() - t0)
            report("prefill", n, 0, 1, best, n)
        for b in [int(x) for x in a.batch_sizes.split(",")]:
            best = float("inf")
            for _ in range(max(1, a.repeats)):
                ids = torch.randint(0, s["vocab"], (b, a.context), device=a.device)
                out = prefill(ids)
                token = torch.ones((b, 1), dtype=torch.long, device=a.device)
                sync(a.device)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    out = step(out, token)
                sync(a.device)
                best = min(best, time.perf_counter() - t0)
                del out
            report("decode", b, a.context, a.steps, best, b * a.steps)
    if csv_file:
        csv_file.close()


if __name__ == "__main__":
    main()
