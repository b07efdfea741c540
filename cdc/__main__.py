"""`python -m cdc ...` and `torchrun -m cdc train ...` enter here."""

from cdc.cli import app

if __name__ == "__main__":
    app(prog_name="cdc")
