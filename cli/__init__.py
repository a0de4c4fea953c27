"""The `medembed` command line: thin typer commands over the library."""
