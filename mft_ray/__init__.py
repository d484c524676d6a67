"""mft_ray: a Ray implementation of "Multiagent Finetuning" (Subramaniam et al., ICLR 2025)."""

__version__ = "0.1.0"
