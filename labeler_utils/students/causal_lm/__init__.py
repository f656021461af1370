"""The causal-LM family: LoRA/QLoRA training (``train``) and one-pass grade-token labeling (``labeler``)."""
