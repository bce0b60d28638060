"""The ``replay`` command line: one module per command, the shared flags declared once.
"""
