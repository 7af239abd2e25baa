"""Built-in stores; each registers itself as an ``overlayd.stores`` entry point."""
