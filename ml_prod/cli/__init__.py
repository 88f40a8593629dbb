"""The `ml_prod` command (Typer): one module per command group, all registered in `main`. Runs on the driver."""
