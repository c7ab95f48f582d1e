"""Entry point of the processes that ``hspace ... --num-processes N`` starts (see ``distributed.launch``)."""

from .distributed import launched_main

if __name__ == "__main__":
    raise SystemExit(launched_main())
