"""Declarative key tables between our checkpoint layouts (BFL) and other formats (diffusers)."""
