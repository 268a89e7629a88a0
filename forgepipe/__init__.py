"""forgepipe: reproducible RLHF fine-tuning (SFT, reward model, PPO) with DeepSpeed on Slurm clusters."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forgepipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
