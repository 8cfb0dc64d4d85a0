"""One invocation of the command line: checks before anything is built (prepare) and the
dispatch of every --mode (modes)."""
