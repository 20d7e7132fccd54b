"""pytest plugin entry point (registered via the ``pytest11`` entry point).

Thin hooks only; the logic lives in plain classes under provisioner/.
"""
