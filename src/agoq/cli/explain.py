"""``agoq explain``: which kind, format and mode each saved tensor of a model gets.

Runs one forward and backward of a small model inside ``quantize_activations(plan)`` and
prints :meth:`agoq.memory.MemoryReport.explain`: the reference LLaMA by default, or an HF
transformers family built from a config (``--hf llama|mistral|qwen2|qwen3|gemma``, random
init, no hub download; needs the ``hf`` extra).
"""

from __future__ import annotations

import argparse

from agoq.cli import user_error

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")  # agoq.hf.FAMILIES, unimported
PLANS = ("agoq", "agoq-norm32", "keep")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``agoq explain``."""
    parser.add_argument("--hf", choices=FAMILIES, help="an HF transformers family (from config)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention")
    parser.add_argument("--plan", default="agoq", choices=PLANS)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--prefix", default="", help="only modules whose FQN starts with this")


def run(args: argparse.Namespace) -> int:
    """Build the model, run one step inside the context and print the explanation."""
    import torch

    from agoq import ActivationPlan, QuantSpec, quantize_activations

    for name in ("hidden", "layers", "seq", "batch"):
        if getattr(args, name) < 1:
            return user_error("explain", f"--{name} must be >= 1")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.hf:
        try:
            from agoq.hf import causal_lm
        except ImportError:
            return user_error("explain", "--hf needs transformers: pip install 'agoq[hf]'")
        heads = max(args.hidden // 32, 1)
        vocab = 512
        model = causal_lm(
            args.hf,
            hidden=args.hidden,
            layers=args.layers,
            heads=heads,
            kv_heads=max(heads // 2, 1),
            vocab=vocab,
            max_positions=max(args.seq, 128),
            attn=args.attn,
            dtype=dtype,
        )
    else:
        from agoq.models.llama import build

        if args.hidden % 32:
            return user_error("explain", "--hidden must be a multiple of 32")
        model = build("tiny", dim=args.hidden, n_layers=args.layers, vocab_size=512).to(dtype)
        vocab = 512
    model.train()
    plan = {
        "agoq": ActivationPlan.agoq(),
        "agoq-norm32": ActivationPlan.agoq(
            norm_spec=QuantSpec(bits=4, format="fp4_e2m1", block=32, scale_dtype=torch.bfloat16)
        ),
        "keep": ActivationPlan.keep_all(),
    }[args.plan]
    ids = torch.randint(
        0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    with quantize_activations(plan) as ctx:
        if args.hf:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1)
            )
    loss.backward()
    unit = args.batch * args.seq * args.hidden * 2
    print(f"U = batch x seq x hidden x 2 bytes = {unit} bytes; plan {args.plan}")
    print(ctx.report.explain(args.prefix, unit=unit))
    return 0
