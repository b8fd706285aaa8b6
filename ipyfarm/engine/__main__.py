"""``python -m ipyfarm.engine``: start an engine (see :mod:`ipyfarm.engine.app`)."""

from ipyfarm.engine.app import main

if __name__ == "__main__":
    main()
