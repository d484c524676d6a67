"""The paper's method, baselines and ablations as data, and the finetuning sets each one builds."""
