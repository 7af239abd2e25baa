"""Built-in backends; each registers itself as an ``overlayd.backends`` entry point."""
