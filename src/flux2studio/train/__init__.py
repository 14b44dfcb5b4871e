"""Fine-tuning: LoRA training on the Base checkpoints, and what training loops share."""
