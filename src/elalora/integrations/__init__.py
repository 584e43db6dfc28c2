"""Integration with training loops: the Hugging Face Trainer callback and distributed helpers."""
