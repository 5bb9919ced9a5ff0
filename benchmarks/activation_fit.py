"""Measure LoRA training activations per token per decoder block and fit the coefficients
that `localtune/memory.py` uses (`_ACT_COEF`, `_ACT_DROPOUT_COEF`).

What it measures
    For tiny random Llama-style models of several shapes (hidden size h, attention width
    q = heads x head_dim, key/value width kv = kv_heads x head_dim, MLP width i), in float32,
    bfloat16 and float32 under `torch.autocast("cpu", bfloat16)` (how the worker trains on a
    CPU that computes bf16 natively), with a peft LoRA adapter on all seven projections (q, k, v, o, gate, up,
    down) and LoRA dropout 0 or 0.05, in training mode, without gradient checkpointing: the
    bytes of every distinct storage that autograd saves for the backward pass during one
    forward pass with a loss (`torch.autograd.graph.saved_tensors_hooks`, deduplicated by
    `untyped_storage().data_ptr()`).

    Per token per block = ((B(4 layers, 512) - B(4 layers, 256)) - (B(2 layers, 512) -
    B(2 layers, 256))) / (2 blocks x 256 tokens): the sequence difference cancels the weights
    and everything else that does not grow with the sequence, the layer difference cancels
    the embedding, the final norm and the loss.

What it fits
    With numpy least squares, per compute dtype:
        no dropout:      bytes = c_h h + c_q q + c_kv kv + c_i i + c_r (r x 7)
        dropout - none:  bytes = d_h h + d_q q + d_kv kv + d_i i
    and the same on the shapes with q = h only, with one coefficient for (h + q): most models
    have q = h, where only the sum matters; the shapes with q != h (Qwen3-0.6B has q = 2h)
    tell the two apart. The rows marked memory.py hold `_ACT_COEF` / `_ACT_DROPOUT_COEF`
    (and, under h+q, what they amount to when q = h); `c_r` is compared with the 4 bytes per
    rank per adapted module that memory.py adds for the LoRA-A outputs. The table above the
    coefficients lists each measurement next to memory.py's prediction for that shape. What
    remains (a few dozen bytes per token per block: RMSNorm's rsqrt, SDPA's logsumexp per
    head) is left out of the formula.

How to run
    python benchmarks/activation_fit.py                   # CPU, 10-90 s
    python benchmarks/activation_fit.py --dtype float32   # one compute dtype only
    python benchmarks/activation_fit.py --dtype autocast  # float32 weights under the CPU's bf16 autocast
    python benchmarks/activation_fit.py --device cuda     # the same on a GPU

It needs torch, transformers and peft (the project's own dependencies), no GPU, no network.
The attention kernel is whatever `sdpa` picks (on the CPU a flash kernel that keeps no
seq x seq matrix; a seq^2 term would show as a mismatch that grows with the sequence).
The coefficients in memory.py were checked on the CPU; `--device cuda` repeats the
measurement with CUDA's kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQS = (256, 512)
LAYERS = (2, 4)


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    r: int

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def label(self) -> str:
        return f"h={self.hidden} q={self.q} kv={self.kv} i={self.intermediate} r={self.r}"


# h, heads, kv heads, head_dim, i, r. h, q, kv and i vary independently of one another (q is
# h in most models, but not in all: Qwen3-0.6B has q = 2h, Gemma-2 q < h), and r varies so
# the LoRA-A term can be told apart.
SHAPES = [
    Shape(64, 4, 2, 16, 128, 8),
    Shape(128, 4, 4, 32, 256, 16),
    Shape(128, 8, 2, 16, 512, 8),
    Shape(96, 6, 2, 16, 384, 16),
    Shape(128, 4, 1, 32, 192, 4),
    Shape(128, 8, 4, 32, 256, 8),     # q = 2h
    Shape(256, 4, 2, 32, 512, 16),    # q = h / 2
    Shape(192, 6, 3, 32, 768, 32),
    Shape(160, 10, 5, 16, 320, 8),
    Shape(64, 8, 2, 32, 256, 4),      # q = 4h
    Shape(256, 4, 4, 16, 384, 8),     # q = h / 4, kv = q
    Shape(96, 4, 4, 64, 128, 16),     # q = 8h / 3, kv = q
]
VOCAB = 128


def build(shape: Shape, layers: int, dtype: torch.dtype, dropout: float, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate, vocab_size=VOCAB, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=shape.r, lora_alpha=2 * shape.r, lora_dropout=dropout,
                                             target_modules=TARGETS))
    model.train()  # dropout masks exist only in training mode
    return model


def saved_bytes(model, seq: int, autocast: bool = False) -> int:
    """Bytes of the distinct storages autograd saves in one forward pass with a loss (under the
    CPU's bfloat16 autocast with `autocast`, as a float32 model trains where the CPU computes
    bf16 natively)."""
    import contextlib

    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seq)).to(model.device)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved.setdefault(s.data_ptr(), s.nbytes())
        return t

    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        out = model(input_ids=ids, labels=ids)
    del out
    return sum(saved.values())


def per_token_per_block(shape: Shape, dtype: torch.dtype, dropout: float, device: str, autocast: bool = False) -> float:
    slope = {}
    for layers in LAYERS:
        model = build(shape, layers, dtype, dropout, device)
        b = {seq: saved_bytes(model, seq, autocast) for seq in SEQS}
        slope[layers] = (b[SEQS[1]] - b[SEQS[0]]) / (SEQS[1] - SEQS[0])
    return (slope[LAYERS[1]] - slope[LAYERS[0]]) / (LAYERS[1] - LAYERS[0])


def predicted(shape: Shape, a: int | str, dropout: float) -> float:
    """memory.py's bytes per token per block for this shape (its own function)."""
    from localtune.knobs import Knobs
    from localtune.memory import activation_bytes_per_token_per_block
    from localtune.models import ModelShape

    ms = ModelShape(model_type="llama", hidden_size=shape.hidden, num_hidden_layers=2,
                    num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                    intermediate_size=shape.intermediate, vocab_size=VOCAB, tie_word_embeddings=False)
    knobs = Knobs(r=shape.r, lora_dropout=dropout, target_modules=TARGETS)
    return activation_bytes_per_token_per_block(ms, knobs, a)


def fit(rows: list[tuple[Shape, float]], columns: str) -> np.ndarray:
    """Least-squares coefficients of `columns` (letters: h, q, s = h + q, k = kv, i, r = r x 7)."""
    col = {"h": lambda s: s.hidden, "q": lambda s: s.q, "s": lambda s: s.hidden + s.q, "k": lambda s: s.kv,
           "i": lambda s: s.intermediate, "r": lambda s: s.r * len(TARGETS)}
    x = np.array([[col[c](s) for c in columns] for s, _ in rows], dtype=float)
    y = np.array([v for _, v in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef


def _row(label: str, values) -> str:
    return f"{label:44s}" + "".join(f"{v:8.2f}" if v == v else f"{'-':>8s}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "autocast", "both", "all"), default="all",
                        help="autocast: float32 weights under the CPU's bfloat16 autocast; both: the two plain "
                             "dtypes; all: the three")
    parser.add_argument("--device", default="cpu", help="torch device to measure on (default: cpu)")
    args = parser.parse_args(argv)

    from localtune.memory import _ACT_COEF, _ACT_DROPOUT_COEF

    modes = {"float32": ["float32"], "bfloat16": ["bfloat16"], "autocast": ["autocast"],
             "both": ["float32", "bfloat16"], "all": ["float32", "bfloat16", "autocast"]}[args.dtype]
    start = time.perf_counter()
    worst = 0.0
    nan = float("nan")
    for mode in modes:
        autocast = mode == "autocast"
        dtype = torch.float32 if autocast else getattr(torch, mode)
        a = "autocast" if autocast else torch.finfo(dtype).bits // 8  # memory.py's key
        base: list[tuple[Shape, float]] = []
        extra: list[tuple[Shape, float]] = []
        print(f"\n== {mode} on {args.device} (memory.py key {a!r}): bytes per token per decoder block")
        print(f"{'shape':40s} {'dropout':>7s} {'measured':>10s} {'memory.py':>10s} {'ratio':>6s}")
        for shape in SHAPES:
            m0 = per_token_per_block(shape, dtype, 0.0, args.device, autocast)
            m1 = per_token_per_block(shape, dtype, 0.05, args.device, autocast)
            base.append((shape, m0))
            extra.append((shape, m1 - m0))
            for p, m in ((0.0, m0), (0.05, m1)):
                pred = predicted(shape, a, p)
                worst = max(worst, abs(pred / m - 1))
                print(f"{shape.label():40s} {p:7.2f} {m:10.0f} {pred:10.0f} {pred / m:6.3f}")
        ch, cq, ckv, ci = _ACT_COEF[a]
        dh, dq, dkv, di = _ACT_DROPOUT_COEF[a]
        square = [(s, v) for s, v in base if s.q == s.hidden]
        square_extra = [(s, v) for s, v in extra if s.q == s.hidden]
        print(f"\ncoefficients (bytes per element per token per block)")
        print(_row("", []) + "".join(f"{c:>8s}" for c in ("h", "q", "h+q", "kv", "i", "r*7")))
        c = fit(base, "hqkir")
        print(_row("fit, no dropout, all shapes", [c[0], c[1], nan, c[2], c[3], c[4]]))
        c = fit(square, "skir")
        print(_row("fit, no dropout, shapes with q = h", [nan, nan, c[0], c[1], c[2], c[3]]))
        print(_row(f"memory.py _ACT_COEF[{a}] (+ 4 r per module)", [ch, cq, (ch + cq) / 2, ckv, ci, 4]))
        d = fit(extra, "hqki")
        print(_row("fit, dropout extra, all shapes", [d[0], d[1], nan, d[2], d[3], nan]))
        d = fit(square_extra, "ski")
        print(_row("fit, dropout extra, shapes with q = h", [nan, nan, d[0], d[1], d[2], nan]))
        print(_row(f"memory.py _ACT_DROPOUT_COEF[{a}]", [dh, dq, (dh + dq) / 2, dkv, di, nan]))
    print(f"\nworst |memory.py / measured - 1| over all rows: {worst:.1%}  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
