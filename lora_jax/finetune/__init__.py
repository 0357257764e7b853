"""The ``lora-jax finetune`` / ``sweep`` jobs: an embedded pretrained model, corpora, training loop."""
