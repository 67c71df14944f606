"""Reference models built in plain PyTorch, used by the built-in example and the tests."""
