"""Fine-tuning: LoRA and QLoRA on ChatGLM with transformers' Trainer and peft, run as its own process.

- `config`: `TrainConfig`, the flags and YAML files that map onto it.
- `data`: reading data files in four formats into chat messages.
- `examples`: training rows through the chat template, cleaning and the validation report.
- `run`: the training run (model, adapter, Trainer, checkpoints) and what it writes.
"""
