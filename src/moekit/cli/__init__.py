"""The `moekit` command line: one module per verb, each thin (parse, call the library, print)."""
