#!/usr/bin/env python3
"""Write reference token ids for safegeo's tokenizer tests, computed by transformers from the same
GGUF files (transformers converts the GGUF vocabulary to its own fast tokenizer).

Usage: $SAFEGEO_HOME/bench-venv/bin/python bench/tokenizer_reference.py > crates/runtime/tests/data/tokenizer_reference.json
(the venv is the one bench/reference.py creates: transformers + gguf).
"""
import json, os
from transformers import AutoTokenizer

HOME = os.environ.get("SAFEGEO_HOME", os.path.expanduser("~/.cache/safegeo"))
MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
}
CORPUS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nmany",
    "digits 1234567890 and 3.14159, 1e-5",
    "unicode: café naïve 日本語 한국어 Ελληνικά 🚀🔥 emoji",
    "code: fn main() { println!(\"{}\", x[0] >> 2); } // comment",
    "def f(x):\n    return x ** 2  # python",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "whitespace runs:          end",
    "ÀÉÎÕÜ ß Ø ¿¡ “quotes” — dashes – …",
    "I'm sorry, but I can't help with that. It's not appropriate.",
    "Sure, here is a step-by-step guide:\n1. First,\n2. Second",
]

out = {"generator": "transformers " + __import__("transformers").__version__, "corpus": CORPUS, "models": {}}
for name, f in MODELS.items():
    tok = AutoTokenizer.from_pretrained(os.path.join(HOME, "models"), gguf_file=f)
    out["models"][name] = [tok.encode(t, add_special_tokens=False) for t in CORPUS]
print(json.dumps(out, ensure_ascii=False, indent=1))
