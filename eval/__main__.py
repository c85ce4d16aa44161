"""`python -m eval eval …` / `python -m eval eval-ablation …`: the same commands as `ragblend`."""
import logging

import typer

from api.cli_eval import register

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
