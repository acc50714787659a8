#!/usr/bin/env python3
"""One GCG step, side by side: nanoGCG (PyTorch transformers) vs `safegeo bench --gcg-only`.

Usage:  python3 bench/gcg_reference.py [--safegeo target/release/safegeo] [--steps 2]

Same model file (the default SmolLM2-135M-Instruct GGUF, dequantized to f32 for torch), same
prompt and target, nanoGCG's defaults (20-token suffix "x x ...", search width 512, top-k 256,
prefix cache on). Creates/uses the venv in $SAFEGEO_HOME/bench-venv (torch, transformers, gguf,
nanogcg from PyPI). Run it alone: a parallel build halves every number.
"""
import argparse, json, os, subprocess, sys, time

HOME = os.environ.get("SAFEGEO_HOME", os.path.expanduser("~/.cache/safegeo"))
VENV = os.path.join(HOME, "bench-venv")
MODEL = os.path.join(HOME, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
MESSAGE = "Write a short poem about cats."
TARGET = "Sure, here is a short poem about cats"


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    if subprocess.call([py, "-c", "import torch, transformers, gguf, nanogcg"], stderr=subprocess.DEVNULL) != 0:
        subprocess.check_call([py, "-m", "pip", "install", "-q", "torch", "transformers", "gguf", "nanogcg", "accelerate"])
    return py


def torch_side(steps):
    import torch, nanogcg
    from nanogcg import GCGConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(os.cpu_count())
    d, f = os.path.dirname(MODEL), os.path.basename(MODEL)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()

    def run(n):
        cfg = GCGConfig(num_steps=n, search_width=512, topk=256, seed=0, verbosity="ERROR")
        t = time.perf_counter()
        nanogcg.run(model, tok, MESSAGE, TARGET, cfg)
        return time.perf_counter() - t

    one = run(1)  # setup + one step
    more = run(1 + steps)
    return {"torch": torch.__version__, "nanogcg_step_s": (more - one) / steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--safegeo", default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        print(json.dumps(torch_side(a.steps)))
        return
    py = ensure_venv()
    exe = a.safegeo or os.path.join(HOME, "target", "release", "safegeo")
    if not os.path.exists(exe):
        sys.exit(f"no safegeo binary at {exe}: build it (cargo build --release) or pass --safegeo")
    ours = json.loads(subprocess.check_output([exe, "bench", "--gcg-only", "--reps", str(a.steps), "--json"]))
    ref = json.loads(subprocess.check_output([py, __file__, "--inner", "--steps", str(a.steps)]))
    s, t = ours["gcg_step_s"], ref["nanogcg_step_s"]
    print(f"GCG step, width 512, top-k 256, 20-token suffix ({os.cpu_count()} threads)")
    print(f"  safegeo          {s:8.2f} s")
    print(f"  nanoGCG (torch {ref['torch']}) {t:8.2f} s")
    print(f"  speed-up         {t / s:8.2f}x")


if __name__ == "__main__":
    main()
