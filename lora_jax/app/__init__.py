"""The ``lora-jax`` application: the command line (:mod:`.cli`) and the finetune/sweep jobs
it runs (an embedded pretrained model, corpora, the training loop, plots). Built on the
library; nothing in the library imports it."""
