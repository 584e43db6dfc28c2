"""The ``elalora`` command line: :mod:`.main` parses, :mod:`.commands` translates arguments into
calls of :mod:`elalora.recipe` and prints. Nothing in the library imports this package.

Imports: anything of elalora (the top of the import order); needs ``pip install 'elalora[cli]'``.
"""
