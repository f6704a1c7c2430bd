"""GenEval-style evaluation of toy-world FLUX models: accuracy per category, fidelity to `toy`."""

from .runner import EvalConfig, PromptItem, evaluate, load_model, load_prompts, psnr

__all__ = ["EvalConfig", "PromptItem", "evaluate", "load_model", "load_prompts", "psnr"]
