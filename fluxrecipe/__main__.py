"""`python -m fluxrecipe` and the `fluxrecipe` command: the command layer (fluxrecipe.cli) does the work."""

from fluxrecipe.cli.app import main

if __name__ == "__main__":
    main()
