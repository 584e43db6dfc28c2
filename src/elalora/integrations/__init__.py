"""Integration with training loops: the Hugging Face Trainer callback and distributed helpers.

Both take the handle by duck type, so they sit below :mod:`elalora.model` in the import order.

Imports: transformers, torch, :mod:`elalora.errors`, :mod:`elalora._io`.
"""
