"""HuggingFace ``transformers.Trainer`` integration: every training micro-batch under agoq.

    from agoq.hf import AgoqTrainer
    trainer = AgoqTrainer(model=model, args=args, train_dataset=ds, agoq_plan=plan)

Needs the ``hf`` extra (``pip install 'agoq[hf]'``: transformers and accelerate, which
``Trainer`` requires). ``import agoq`` never imports this module or transformers.

Why a ``training_step`` override and not a ``TrainerCallback``: a callback has no hook that
runs when a step raises. A context entered in ``on_step_begin`` and left in ``on_step_end``
stays entered after an exception in forward or backward (an OOM that
``auto_find_batch_size`` retries, a user's ``except``), so every later forward in the thread
would still be quantized. ``Trainer.training_step`` is the one method that runs exactly one
micro-batch's forward *and* backward, so a ``with`` block around it

* leaves the context on every exit, exceptions included;
* runs each micro-batch of a gradient-accumulation step in its own entry (the context may
  be entered every step; its report accumulates);
* never covers evaluation or prediction, which the Trainer runs through
  ``prediction_step`` outside ``training_step``;
* enters the context outside the model call, as agoq expects, so the whole model is seen
  (module names, parameters) and ``torch.compile`` / DDP / FSDP wrappers stay outside.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("agoq.hf needs HuggingFace transformers: pip install 'agoq[hf]'") from e

from .activations import ActivationContext, ActivationPlan, quantize_activations

__all__ = ["AgoqTrainer", "AgoqTrainerMixin", "FAMILIES", "causal_lm"]

#: The HF families agoq's rules name, and their config classes.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def causal_lm(
    family: str,
    *,
    hidden: int = 256,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int = 8,
    kv_heads: int = 4,
    head_dim: int = 32,
    vocab: int = 512,
    max_positions: int = 1024,
    attn: str = "sdpa",
    dtype: Any = None,
) -> Any:
    """A small HF causal LM of ``family`` built from a config (random init, no hub), in
    training mode and without a KV cache: what ``agoq explain --hf`` and the benchmarks
    measure. ``intermediate`` defaults to about 8/3 x ``hidden``."""
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
    }
    if family not in configs:
        raise ValueError(f"causal_lm: unknown family {family!r}; known: {list(configs)}")
    cfg = configs[family](
        hidden_size=hidden,
        intermediate_size=intermediate or (hidden * 8 // 3 + 15) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
        use_cache=False,  # training: no KV cache (dynamo would guard on each layer's index)
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.train()


class AgoqTrainerMixin:
    """Mix in before a ``transformers.Trainer`` class (``class T(AgoqTrainerMixin,
    Trainer)``, also over a Trainer subclass such as TRL's) to run every training
    micro-batch's forward and backward inside one agoq activation context.

    ``agoq_plan``: the :class:`~agoq.ActivationPlan` (default: the paper's plan,
    :meth:`ActivationPlan.agoq`). ``agoq_context``: the :class:`~agoq.ActivationContext`,
    entered once per micro-batch; its ``report`` accumulates over steps
    (``report.clear()`` to start over) and its ``plan`` may be replaced between steps (e.g.
    by :class:`agoq.NumericsGuard`).
    """

    agoq_context: ActivationContext

    def __init__(self, *args: Any, agoq_plan: ActivationPlan | None = None, **kwargs: Any) -> None:
        # Before Trainer's __init__: the plan is validated even if the Trainer fails to build.
        self.agoq_context = quantize_activations(agoq_plan)
        super().__init__(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.training_step`` (forward and backward of one micro-batch) inside the
        agoq context; the context is left however the step ends."""
        with self.agoq_context:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]


class AgoqTrainer(AgoqTrainerMixin, Trainer):
    """``transformers.Trainer`` with every training micro-batch under agoq: takes
    ``Trainer``'s arguments plus ``agoq_plan`` (see :class:`AgoqTrainerMixin`)."""
