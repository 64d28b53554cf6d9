"""emaki: the `emaki` command, the one front door besides Discord."""
