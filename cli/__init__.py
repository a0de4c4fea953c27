"""The `medembed` command line: thin typer commands over the library.

Installed as `medembed.cli` (pyproject.toml maps this top-level folder there, so no top-level `cli` package is
installed to clash with other projects'); a checkout also imports it as `cli` (`python -m cli.main`). The modules
import each other relatively, so both names work."""
