"""flux2studio: run, edit, fine-tune and serve the FLUX.2 family."""
