"""The embedded `nano` model's world: Shapes scenes, captions, the prompt-adherence checker and training."""
