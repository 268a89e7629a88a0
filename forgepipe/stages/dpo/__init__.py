"""Direct preference optimisation: losses.py (pure maths), reference.py (the frozen reference's
log-probs: on the fly, with LoRA adapters off, or precomputed and cached), trainer.py (the stage)."""
