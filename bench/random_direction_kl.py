#!/usr/bin/env python3
"""The KL cost of ablating random unit directions, in PyTorch: the scale of `select --kl-max`.

Usage:  bench/random_direction_kl.py [--directions 6] [--prompts 32] [--keep-first]
        (run with the bench venv's python: ~/.cache/safegeo/bench-venv/bin/python,
         made by bench/reference.py)

Directional ablation as docs/protocol.md §2 defines it (x <- x - (x . r) r at every layer and position),
written as hooks that project r out of the embedding output and of every attention and MLP
output, on the default SmolLM2-135M-Instruct GGUF dequantized to f32 by transformers. KL is
KL(P_base || P_ablated) at the last position, averaged over the first N harmless-val prompts in
the model's chat template, exactly what `safegeo select` reports as
`baseline.random_direction_kl`. `--keep-first` leaves position 0 (the attention sink) unablated.
Measured results: docs/experiments.md (the random-direction floor).
"""
import argparse, json, os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HOME = os.environ.get("SAFEGEO_HOME", os.path.expanduser("~/.cache/safegeo"))
MODEL = os.path.join(HOME, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DATA = os.environ.get("SAFEGEO_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--directions", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-first", action="store_true", help="do not ablate position 0")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.dirname(MODEL), os.path.basename(MODEL)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    with open(os.path.join(DATA, "refusal_splits", "harmless_val.json")) as fh:
        prompts = [x["instruction"] for x in json.load(fh)[: a.prompts]]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    state = {"r": None}

    def project_out(x):
        r = state["r"]
        y = x - (x @ r).unsqueeze(-1) * r
        if a.keep_first:
            y[..., 0, :] = x[..., 0, :]
        return y

    def hook(_module, _inputs, out):
        if state["r"] is None:
            return out
        return (project_out(out[0]),) + out[1:] if isinstance(out, tuple) else project_out(out)

    m.model.embed_tokens.register_forward_hook(hook)
    for layer in m.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.down_proj.register_forward_hook(hook)

    def last_logprobs():
        rows = []
        for t in texts:
            ids = tok(t, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                rows.append(torch.log_softmax(m(ids).logits[0, -1].double(), -1))
        return torch.stack(rows)

    base = last_logprobs()
    g = torch.Generator().manual_seed(a.seed)
    kls = []
    for k in range(a.directions):
        r = torch.randn(m.config.hidden_size, generator=g)
        state["r"] = (r / r.norm()).float()
        lp = last_logprobs()
        state["r"] = None
        kl = (base.exp() * (base - lp)).sum(-1)
        kls.append(kl.mean().item())
        print(f"direction {k}: mean KL {kl.mean():.4f} (median {kl.median():.4f}, max {kl.max():.4f})", flush=True)
    print(json.dumps({"random_direction_kl": kls, "mean": sum(kls) / len(kls), "keep_first": a.keep_first}))


if __name__ == "__main__":
    main()
