"""Finetuning: chat-template tokenization with loss masks, and the Ray Train per-worker loop."""
