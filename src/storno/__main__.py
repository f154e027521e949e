"""``python -m storno``: the same as the ``storno`` command."""

from storno._cli import main

if __name__ == "__main__":
    main(prog_name="storno")
