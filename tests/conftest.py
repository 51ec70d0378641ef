"""Shared pytest setup: fixture modules live in tests/fixtures/, one per resource."""

pytest_plugins = [
    "tests.fixtures.tokenizers",
    "tests.fixtures.checkpoints",
]
