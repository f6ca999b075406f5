"""The `zoo` command line, one module per command. Each defines `add_arguments(parser)` and
`run(args) -> exit code`, and calls the library's Python API: nothing else in the package parses argv."""
